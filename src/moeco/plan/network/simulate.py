"""`simulate`: one collective on one network, routed one way, with or without a failure.

    time      = sum over phases of [ steps x (slowest transfer's path latency)      latency.py
                                     + time the last flow finishes (max-min) ]      flows.py
    algbw     = S / time;  busbw = algbw (K-1)/K                                    collectives.py

ECMP draws its hashes from `seeds` seeds; the times are averaged (the bandwidths reported are
S / mean time, with the worst and best seed beside them). Adaptive and static routing are
deterministic. Because max-min rates do not depend on sizes, the bandwidth term is linear in S:
`sweep` runs the flows once and prices every message size from it.
"""

from __future__ import annotations

import numpy as np

from moeco.errors import ConfigError
from moeco.plan.arch import load_arch
from moeco.plan.hardware import get_device, get_link, load_catalog
from moeco.plan.network.collectives import collective_phases, moe_traffic
from moeco.plan.network.failures import apply_failure
from moeco.plan.network.flows import complete, flowset_from_paths
from moeco.plan.network.graph import Network, build_network
from moeco.plan.network.latency import latency_model
from moeco.plan.network.paths import route

LINK_ALIASES = {"ib": "ib-400g", "roce": "roce-400g"}


def make_network(topology: str, gpus: int, gpus_per_node: int = 8, link: str = "ib", device: str = "H800",
                 radix: int = 64, hardware: str | None = None) -> Network:
    if gpus < 1:
        raise ConfigError(f"--gpus = {gpus} is invalid: need at least 1 GPU (e.g. --gpus 32)")
    if gpus_per_node < 1 or gpus % gpus_per_node:
        raise ConfigError(f"--gpus = {gpus} is invalid with --gpus-per-node = {gpus_per_node}: "
                          "use a whole number of nodes (a multiple of --gpus-per-node)")
    catalog = load_catalog(hardware)
    name = LINK_ALIASES.get(link, link)
    if name not in catalog["links"] or name.startswith(("nvlink", "nvl", "pcie", "infinity")):
        raise ConfigError(f"--link = {link!r} is invalid: choose ib or roce (or a scale-out link added with "
                          "--hardware FILE.toml)")
    nic = get_link(name, catalog)
    dev = get_device(device, catalog)
    return build_network(topology, gpus // gpus_per_node, gpus_per_node, nic, get_link(dev.intra_link, catalog),
                         radix)


def run_phases(net: Network, phases, routing: str, seed: int, channels: int, pxn: bool) -> dict:
    lat = latency_model(net.nic, net.nvlink)
    cap = np.asarray(net.cap_gbs, dtype=float)
    rng = np.random.default_rng(seed)
    bw_ns, lat_us = 0.0, 0.0
    link_bytes = np.zeros(len(cap))
    for ph in phases:
        flows, sizes, _, latency = route(net, ph.src, ph.dst, ph.nbytes, routing, lat, rng, channels, pxn)
        lat_us += ph.steps * float(latency.max(initial=0.0))
        if flows:
            done = complete(cap, flowset_from_paths(flows, sizes))
            bw_ns += done.time_ns
            link_bytes += done.link_bytes
    return {"bandwidth_time_us": bw_ns / 1e3, "latency_us": lat_us, "link_bytes": link_bytes}


def _runs(net, phases, routing, seeds, channels, pxn) -> list[dict]:
    if seeds < 1:
        raise ConfigError(f"--seeds = {seeds} is invalid: must be >= 1")
    if channels < 1:
        raise ConfigError(f"--channels = {channels} is invalid: must be >= 1")
    return [run_phases(net, phases, routing, s, channels, pxn) for s in range(seeds if routing == "ecmp" else 1)]


def _summary(net: Network, runs: list[dict], message_bytes: float, k: int) -> dict:
    times = np.array([r["bandwidth_time_us"] + r["latency_us"] for r in runs])
    t = float(times.mean())
    cap = np.asarray(net.cap_gbs, dtype=float)
    util = max(float(np.max(r["link_bytes"] / (cap * 1e3 * (r["bandwidth_time_us"] + r["latency_us"]))))
               for r in runs)
    algbw = message_bytes / (t * 1e3)
    factor = (k - 1) / k
    return {"time_us": t, "latency_us": float(np.mean([r["latency_us"] for r in runs])),
            "algorithm_bandwidth_gbps": algbw, "bus_bandwidth_gbps": algbw * factor,
            "bus_bandwidth_gbps_range": [message_bytes / (float(times.max()) * 1e3) * factor,
                                         message_bytes / (float(times.min()) * 1e3) * factor],
            "max_link_utilization": util, "group_size": k}


def simulate(net: Network, collective: str = "all-to-all", message_bytes: float = 2 ** 28, routing: str = "adaptive",
             tp: int | None = None, algorithm: str = "ring", channels: int = 2, seeds: int = 4, pxn: bool = True,
             fail: str | None = None, model: str = "deepseek-v3", tokens_per_gpu: int = 4096,
             max_nodes: int | None = None, samples: int = 128) -> dict:
    """One collective on `net`; with `fail`, also the healthy run and `bandwidth_kept`."""
    failed, what = apply_failure(net, fail)
    extra = {}
    if collective in ("dispatch", "combine"):
        a = load_arch(model)
        if not a.is_moe:
            raise ConfigError(f"--collective {collective} needs an MoE model; {a.name} has no routed experts")
        m = max_nodes if max_nodes is not None else min(a.topk_group if a.n_group > 1 else 4, net.nodes)
        phases, extra = moe_traffic(net, a.n_routed_experts, a.num_experts_per_tok, a.hidden_size, tokens_per_gpu,
                                    m, samples, combine=collective == "combine")
        message_bytes = float(phases[0].nbytes.sum()) / net.gpus  # bytes each GPU sends, NVLink included
        k = net.gpus
        extra.update(model=a.name, max_nodes=m, tokens_per_gpu=tokens_per_gpu)
    else:
        phases, k = collective_phases(net, collective, message_bytes, tp, algorithm)
    out = _summary(failed, _runs(failed, phases, routing, seeds, channels, pxn), message_bytes, k)
    if collective in ("dispatch", "combine"):
        out["nic_bandwidth_gbps"] = extra["inter_node_bytes_per_gpu"] / (out["time_us"] * 1e3)
        out["deepep_bandwidth_gbps"] = extra["node_copies_bytes_per_gpu"] / (out["time_us"] * 1e3)
    out.update({"topology": net.topology, "gpus": net.gpus, "nodes": net.nodes, "gpus_per_node": net.gpus_per_node,
                "radix": net.radix, "link": net.nic.name, "nvlink": net.nvlink.name, "routing": routing,
                "collective": collective, "algorithm": algorithm, "message_bytes": message_bytes, "tp": tp,
                "channels": channels, "seeds": seeds if routing == "ecmp" else 1, "pxn": pxn, "failure": what,
                **extra})
    if fail not in (None, "", "none"):
        healthy = _summary(net, _runs(net, phases, routing, seeds, channels, pxn), message_bytes, k)
        out["healthy_bus_bandwidth_gbps"] = healthy["bus_bandwidth_gbps"]
        out["bandwidth_kept"] = out["bus_bandwidth_gbps"] / healthy["bus_bandwidth_gbps"]
    return out


def sweep(net: Network, collective: str, sizes: list[float], routing: str, tp: int | None = None,
          algorithm: str = "ring", channels: int = 2, seeds: int = 4, pxn: bool = True) -> list[dict]:
    """Bus bandwidth at each message size from one flow run (the bandwidth term is linear in S)."""
    ref = float(max(sizes))
    phases, k = collective_phases(net, collective, ref, tp, algorithm)
    runs = _runs(net, phases, routing, seeds, channels, pxn)
    out = []
    for s in sizes:
        scaled = [{**r, "bandwidth_time_us": r["bandwidth_time_us"] * s / ref, "link_bytes": r["link_bytes"] * s / ref}
                  for r in runs]
        out.append({"message_bytes": s, **_summary(net, scaled, s, k)})
    return out
