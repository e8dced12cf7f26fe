"""The reproduction table: every figure of the ISCA paper the planner can recompute, beside ours.

Each row computes moeco's value from the formulas and inputs (configs, catalog, topology builders);
only the paper's printed value is typed in here, as the thing to compare against. A row is
"reproduced" when ours rounds to the paper's figure within the stated tolerance, else "differs",
with the reason ("fitted" marks the Table 3 prices, which are fitted, not reproduced).
Known differences (facts file §17):

    Table 1   7.28x for LLaMA-3.1-405B: the printed KB give 516.096 / 70.272 = 7.344x
    Table 2   Qwen-72B 394 and LLaMA-405B 2448 GFLOP: no convention reproduces them together with
              the DeepSeek rows (6 x params alone exceeds 394 for every 72B Qwen)
    Table 3   prices are not published; ours are a two-price fit (topology.py), within 1.5%
    §2.2.2    "nearly 20 TPS" has no derivation in the paper; ours is a bandwidth bound x 0.8
"""

from __future__ import annotations

from moeco.plan.costs import kv_bytes_per_token, param_counts, train_flops_per_token
from moeco.plan.hardware import get_device, get_link
from moeco.plan.speed import ep_comm_limit, local_decode
from moeco.plan.topology import LINK_COST_USD, SWITCH_COST_USD, build, fit_prices

# Table 3 as printed: endpoints, switches, links, cost M$, cost per endpoint k$
TABLE3 = {
    "ft2": (2_048, 96, 2_048, 9, 4.39),
    "mpft": (16_384, 768, 16_384, 72, 4.39),
    "ft3": (65_536, 5_120, 131_072, 491, 7.5),
    "slimfly": (32_928, 1_568, 32_928, 146, 4.4),
    "dragonfly": (261_632, 16_352, 384_272, 1_522, 5.8),
}


def _row(table: str, quantity: str, paper, ours: float, ok: bool, note: str = "") -> dict:
    return {"table": table, "quantity": quantity, "paper": paper, "moeco": ours,
            "status": "reproduced" if ok else "differs", "note": note}


def _close(ours: float, paper: float, rel: float) -> bool:
    return abs(ours - paper) <= rel * abs(paper)


def reproduction_rows() -> list[dict]:
    rows: list[dict] = []
    # ---- Table 1: KV cache per token (BF16, KB = 1000 B) ---------------------------------
    kv = {m: kv_bytes_per_token(m) / 1e3 for m in ("deepseek-v3", "qwen2.5-72b", "llama-3.1-405b")}
    for model, paper in (("deepseek-v3", 70.272), ("qwen2.5-72b", 327.680), ("llama-3.1-405b", 516.096)):
        rows.append(_row("ISCA Table 1", f"KV KB/token {model}", paper, kv[model], kv[model] == paper,
                         "MLA: L (d_c + d_r) 2" if model == "deepseek-v3" else "GQA: 2 L n_kv h 2"))
    q_ratio = kv["qwen2.5-72b"] / kv["deepseek-v3"]
    l_ratio = kv["llama-3.1-405b"] / kv["deepseek-v3"]
    rows.append(_row("ISCA Table 1", "KV ratio Qwen2.5-72B / V3", 4.66, q_ratio, round(q_ratio, 2) == 4.66))
    rows.append(_row("ISCA Table 1", "KV ratio LLaMA-3.1-405B / V3", 7.28, l_ratio, round(l_ratio, 2) == 7.28,
                     "the paper's own KB figures give 7.344x; 7.28x would need ~511.6 KB"))
    # ---- parameters ----------------------------------------------------------------------
    v3, v2 = param_counts("deepseek-v3"), param_counts("deepseek-v2")
    rows.append(_row("ISCA §1 / TR", "V3 params total (B)", 671, v3.total / 1e9, _close(v3.total / 1e9, 671, 0.02)))
    rows.append(_row("ISCA §1 / TR", "V3 params active (B)", 37, v3.active / 1e9, _close(v3.active / 1e9, 37, 0.02),
                     "incl. embedding and head; 36.63 without the embedding"))
    rows.append(_row("ISCA §2.2.2", "V2 params total (B)", 236, v2.total / 1e9, _close(v2.total / 1e9, 236, 0.02)))
    v2_act = (v2.active - v2.embedding) / 1e9
    rows.append(_row("ISCA §2.2.2", "V2 params active (B)", 21, v2_act, _close(v2_act, 21, 0.02),
                     "excl. embedding (a lookup)"))
    # ---- Table 2: training GFLOP per token at 4096 ----------------------------------------
    conv = "6 P_mm (head in, embedding out) + 3 L s n_h (d_qk + d_v), causal"
    for model, paper, why in (
        ("deepseek-v2", 155, conv),
        ("deepseek-v3", 250, conv),
        ("qwen2.5-72b", 394, "not reproducible: 6 x matmul params alone is > 421 for every 72B Qwen (facts §17)"),
        ("llama-3.1-405b", 2448, "not reproducible with the convention that gives the DeepSeek rows (facts §17)"),
    ):
        ours = train_flops_per_token(model, 4096) / 1e9
        rows.append(_row("ISCA Table 2", f"train GFLOP/token {model}", paper, ours, abs(ours - paper) <= 1, why))
    implied = 385e12 * 2048 / (272.80e9 / 86400) / 1e9
    ours = train_flops_per_token("deepseek-v3", 4096) / 1e9
    rows.append(_row("ISCA Table 4", "V3 GFLOP/token implied by 385 TFLOPS, 2048 GPUs, 272.80B tok/day",
                     round(implied, 1), ours, _close(ours, implied, 0.005), "same causal count as Table 2"))
    mfu = 385 / get_device("H800").bf16_tflops * 100
    rows.append(_row("ISCA Table 4", "causal MFU % (385 TFLOPS / H800 BF16 peak)", 38.94, mfu, abs(mfu - 38.94) < 0.05))
    # ---- §2.3.2: EP communication limit ---------------------------------------------------
    for link, paper in (("ib-400g", (120.96, 14.76, 67)), ("nvl72", (6.72, 0.82, 1200))):
        r = ep_comm_limit(7000, 61, get_link(link).bandwidth_gbs)
        rows.append(_row("ISCA §2.3.2", f"EP transfer us ({link})", paper[0], r["transfer_us"],
                         round(r["transfer_us"], 2) == paper[0], "hidden '7K' = 7000, 32 tokens, 9 experts, 1+2 B"))
        rows.append(_row("ISCA §2.3.2", f"TPOT ms ({link})", paper[1], r["tpot_ms"], round(r["tpot_ms"], 2) == paper[1],
                         "61 layers x 2 micro-batches"))
        tps_ok = int(r["tokens_per_s"]) == paper[2] if link == "ib-400g" else _close(r["tokens_per_s"], paper[2], 0.05)
        rows.append(_row("ISCA §2.3.2", f"tokens/s ({link})", paper[2], r["tokens_per_s"], tps_ok,
                         "paper floors 67.76" if link == "ib-400g" else "paper: 'approximately 1200'"))
    # ---- Table 3: topologies ----------------------------------------------------------------
    for name, (ep, sw, ln, musd, kusd) in TABLE3.items():
        t = build(name)
        c = t.cost()
        counts_ok = (t.endpoints, t.switches, t.links) == (ep, sw, ln)
        rows.append(_row("ISCA Table 3", f"{name} endpoints/switches/links", f"{ep}/{sw}/{ln}",
                         f"{t.endpoints}/{t.switches}/{t.links}", counts_ok,
                         ", ".join(f"{k} {v}" for k, v in t.params.items())))
        per = c["cost_per_endpoint_usd"] / 1e3
        rows.append(_row("ISCA Table 3", f"{name} cost per endpoint k$", kusd, per, _close(per, kusd, 0.05),
                         f"assumed: switch ${SWITCH_COST_USD:,}, link ${LINK_COST_USD:,}"))
        rows.append(_row("ISCA Table 3", f"{name} cost M$", musd, c["cost_usd"] / 1e6,
                         _close(c["cost_usd"] / 1e6, musd, 0.05)))
    s, l, worst = fit_prices([(build(n), v[4] * 1e3) for n, v in TABLE3.items()])
    rows.append(_row("ISCA Table 3", "price fit (switch $, link $)", "not published", f"{s:,.0f} / {l:,.0f}",
                     worst < 0.05, f"least squares on relative error, worst column {worst:.1%}; "
                                   "a length-dependent cable cost (Slim Fly method) is not modelled"))
    rows[-1]["status"] = "fitted"
    # ---- §2.2.2: local deployment --------------------------------------------------------------
    amd = get_device("Ryzen-AI-Max-395")
    r = local_decode("deepseek-v2", amd, weight_bits=4)
    rows.append(_row("ISCA §2.2.2", "V2 (21B active) 4-bit on 256 GB/s, tokens/s", "nearly 20",
                     r["tokens_per_s"], 17 <= r["tokens_per_s"] <= 22,
                     f"bound {r['tokens_per_s_bound']:.1f} x 0.8 bandwidth efficiency; the paper shows no derivation"))
    r = local_decode("llama-3.1-70b", amd, weight_bits=4)
    rows.append(_row("ISCA §2.2.2", "70B dense 4-bit on 256 GB/s, tokens/s", "single digit",
                     r["tokens_per_s_bound"], r["tokens_per_s_bound"] < 10, "upper bound"))
    r = local_decode("deepseek-v2", get_device("M4-Max"), weight_bits=4)
    rows.append(_row("ISCA §2.2.2", "V2 4-bit on M4 Max (546 GB/s), tokens/s", "or even twice that",
                     r["tokens_per_s"], r["tokens_per_s"] >= 35, "bandwidth x 2.13"))
    # ---- TR §3.2.2: node-limited routing headroom -----------------------------------------------
    ratio = get_link("nvlink-h800").achievable_gbs / get_link("ib-400g").bandwidth_gbs
    rows.append(_row("TR §3.2.2", "experts per token at the IB cost of 4 nodes", 13, 4 * ratio,
                     round(4 * ratio) == 13, "4 nodes x (160 / 50 = 3.2) experts per node"))
    return rows


def summary(rows: list[dict]) -> dict:
    return {"rows": rows, "reproduced": sum(r["status"] == "reproduced" for r in rows),
            "differs": sum(r["status"] == "differs" for r in rows)}
