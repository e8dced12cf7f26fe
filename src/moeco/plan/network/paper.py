"""The paper's network figures beside the flow-level model (`moeco plan network --paper`).

Every model value is simulated here from the graph, the routing mode and the catalog; only the
paper's printed values are typed in, to compare against. A row is "reproduced" when the model
gives the paper's qualitative result under the stated criterion, "differs" otherwise, and
"input" when the paper's value is the model's input (Table 5's latencies).

    Fig. 5    NCCL all-to-all, MPFT vs MRFT, 32-128 GPUs, large messages: "very similar"
    Fig. 6    all-to-all latency, 16 GPUs, 64 B - 16 GiB: MPFT vs MRFT within +-1.5%
    Fig. 7    DeepEP dispatch / combine on MPFT, 16-128 GPUs, 4096 tokens: each GPU > 40 GB/s
    Table 4   V3 training on MPFT vs MRFT: 272.80 vs 272.52 B tokens/day (ratio 1.0010)
    Table 5   64 B latency, same leaf / cross leaf, IB vs RoCE (the latency model's inputs)
    Fig. 8    RoCE all-gather / reduce-scatter, TP 8 / 4 / 2: ECMP well below adaptive and static
              (third-party bar readings: ECMP ~45/83/97, AR/static ~57/103/190)

Fig. 8's setup is not fully described in the paper; the model's is: 16 nodes x 8 GPUs on a
top-of-rack ft2 of radix-64 RoCE switches, TP groups one GPU per node spread over the cluster
(collectives.py), ring all-gather of 1 GiB, NCCL's 2 channels per peer hashed by ECMP, 8 seeds.
"""

from __future__ import annotations

import numpy as np

from moeco.plan.network.collectives import Phase
from moeco.plan.network.simulate import make_network, run_phases, simulate, sweep

FIG8_PAPER = {8: (45, 57), 4: (83, 103), 2: (97, 190)}  # TP: (ECMP, AR/static) bar readings [S/U]
FIG7_PAPER = {16: (43.05, 42.47), 32: (58.02, 56.96), 64: (50.58, 48.54), 128: (45.34, 41.6)}
TABLE5 = {("ib", "same leaf"): 2.8, ("ib", "cross leaf"): 3.7, ("roce", "same leaf"): 3.6,
          ("roce", "cross leaf"): 5.6}


def _row(figure: str, quantity: str, paper, model, ok: bool | None, note: str = "") -> dict:
    status = "input" if ok is None else ("reproduced" if ok else "differs")
    return {"figure": figure, "quantity": quantity, "paper": paper, "model": model, "status": status, "note": note}


def point_to_point_us(link: str, same_leaf: bool) -> float:
    """64 B from GPU 0 to a GPU on its own leaf or on another leaf (ft2, radix 64, 8 GPUs per node)."""
    net = make_network("ft2", 64, link=link)
    dst = 8 if same_leaf else 32  # 32 NICs per leaf: GPU 8 shares GPU 0's leaf, GPU 32 does not
    ph = Phase(np.array([0]), np.array([dst]), np.array([64.0]), 1)
    r = run_phases(net, [ph], "static", seed=0, channels=1, pxn=True)
    return r["latency_us"] + r["bandwidth_time_us"]


def fig8(tp: int, seeds: int = 8) -> dict:
    net = make_network("ft2", 128, link="roce")
    return {mode: simulate(net, "all-gather", 2 ** 30, mode, tp=tp, seeds=seeds)["bus_bandwidth_gbps"]
            for mode in ("ecmp", "adaptive", "static")}


def network_rows(fast: bool = False) -> list[dict]:
    rows = []
    # ---- Fig. 5 / Table 4: MPFT vs MRFT all-to-all ------------------------------------------
    for gpus in ((32, 128) if fast else (32, 64, 128)):
        bw = {t: simulate(make_network(t, gpus), "all-to-all", 2 ** 32, "static")["bus_bandwidth_gbps"]
              for t in ("mpft", "mrft")}
        ratio = bw["mrft"] / bw["mpft"]
        rows.append(_row("ISCA Fig. 5", f"all-to-all busbw {gpus} GPUs, 4 GiB: MRFT / MPFT", "very similar",
                         f"{ratio:.3f} ({bw['mpft']:.1f} vs {bw['mrft']:.1f} GB/s)", abs(ratio - 1) <= 0.05,
                         "NIC-bound on both; PXN keeps every transfer on one rail"))
    ep64 = {t: simulate(make_network(t, 64), "all-to-all", 2 ** 30, "static")["bus_bandwidth_gbps"]
            for t in ("mpft", "mrft")}
    rows.append(_row("ISCA Table 4", "training throughput MPFT / MRFT (model: EP64 all-to-all busbw)",
                     round(272.80 / 272.52, 4), round(ep64["mpft"] / ep64["mrft"], 4),
                     abs(ep64["mpft"] / ep64["mrft"] - 272.80 / 272.52) < 0.01,
                     "the network term only; compute and the pipeline are the same on both"))
    # ---- Fig. 6: latency across message sizes ----------------------------------------------------
    sizes = [64 * 4 ** i for i in range(14)]  # 64 B .. 16 GiB
    a, b = (sweep(make_network(t, 16), "all-to-all", sizes, "static") for t in ("mpft", "mrft"))
    worst = max(abs(x["time_us"] / y["time_us"] - 1) for x, y in zip(a, b))
    rows.append(_row("ISCA Fig. 6", "all-to-all time 16 GPUs, 64 B-16 GiB: max |MRFT/MPFT - 1|", "< 1.5%",
                     f"{worst:.2%}", worst < 0.015, f"64 B: {a[0]['time_us']:.2f} us on both"))
    # ---- Fig. 7: DeepEP on MPFT --------------------------------------------------------------------
    for gpus in ((16, 64) if fast else (16, 32, 64, 128)):
        net = make_network("mpft", gpus)
        d = simulate(net, "dispatch", routing="static", samples=32 if fast else 64)
        c = simulate(net, "combine", routing="static", samples=32 if fast else 64)
        pd, pc = FIG7_PAPER[gpus]
        rows.append(_row("ISCA Fig. 7", f"DeepEP EP{gpus} dispatch / combine GB/s per GPU", f"{pd} / {pc}",
                         f"{d['nic_bandwidth_gbps']:.1f} / {c['nic_bandwidth_gbps']:.1f} NIC; "
                         f"{d['deepep_bandwidth_gbps']:.1f} / {c['deepep_bandwidth_gbps']:.1f} with own-node copies",
                         min(d["nic_bandwidth_gbps"], c["nic_bandwidth_gbps"]) > 40,
                         "claim: > 40 GB/s, near the 50 GB/s NIC; the bars' metric is not fully specified"))
    # ---- Table 5: latency ----------------------------------------------------------------------------
    for (link, where), paper in TABLE5.items():
        model = point_to_point_us(link, where == "same leaf")
        rows.append(_row("ISCA Table 5", f"64 B latency {link.upper() if link == 'ib' else 'RoCE'} {where} (us)",
                         paper, round(model, 2), None, "o + h x switches, fitted to these two values per link"))
    # ---- Fig. 8: RoCE routing ----------------------------------------------------------------------
    for tp in ((8, 2) if fast else (8, 4, 2)):
        r = fig8(tp, seeds=4 if fast else 8)
        pe, pa = FIG8_PAPER[tp]
        ok = r["ecmp"] < 0.9 * r["adaptive"] and abs(r["static"] / r["adaptive"] - 1) < 0.05
        rows.append(_row("ISCA Fig. 8", f"RoCE all-gather TP{tp}: ECMP / adaptive / static busbw",
                         f"{pe} / {pa} / ~{pa} (ECMP/AR {pe / pa:.2f})",
                         f"{r['ecmp']:.1f} / {r['adaptive']:.1f} / {r['static']:.1f} (ECMP/AR "
                         f"{r['ecmp'] / r['adaptive']:.2f})", ok,
                         "direction reproduced (ECMP < 0.9 x adaptive, static = adaptive); the model's ECMP "
                         "loss is larger than the bars' and lacks their TP trend"))
    return rows


def summary(rows: list[dict]) -> dict:
    return {"rows": rows, **{k: sum(r["status"] == k for r in rows) for k in ("reproduced", "differs", "input")}}
