"""Bytes between nodes per token, direct vs two-hop dispatch, against moeco's planner (CPU, no GPUs).

    python bench/ep_bytes.py                                   # DeepSeek-V3 on 8 nodes x 8 GPUs
    python bench/ep_bytes.py --model small --nodes 8 --gpus-per-node 1

Routing: moeco's Router of the model (group-limited top-K, `topk_group` of `n_group` groups, one group
per node) with random weights on random inputs: a balanced load, as the planner assumes; and the same
router without the group limit (n_group = 1) for contrast. Each token starts on a rank (t mod N G). Rows
are counted by `moeco.parallel.traffic.rows_per_token`, the formula the dispatchers' byte counters
follow (the tests check the two agree on a real 4-process run). Bytes per token and MoE layer:

    inter = inter rows x (dispatch row + combine row),  dispatch row = D (FP8: + 4 D/128 scales) or 2 D (BF16),
    combine row = 2 D (BF16)

The planner (`moeco.plan.routing.routing_plan`, 1 byte + 2 bytes per element) samples the same
layout: its `naive` figure is one copy per remote expert (the direct dispatcher), its forwarded
figure one copy per remote node (two-hop). The ratio measured / planner is printed for both.
"""

from __future__ import annotations

import argparse
import json

import torch

from moeco.config import ModelConfig
from moeco.model.moe import Router
from moeco.parallel.traffic import rows_per_token
from moeco.plan.routing import routing_plan


def measure(config: ModelConfig, nodes: int, gpus: int, tokens_per_rank: int, seed: int) -> dict:
    torch.manual_seed(seed)
    router = Router(config)
    torch.nn.init.normal_(router.weight, std=config.initializer_range)
    P = nodes * gpus
    x = torch.randn(P * tokens_per_rank, config.hidden_size)
    with torch.no_grad():
        idx = router.eval()(x).indices_TK
    rows = rows_per_token(idx, torch.arange(idx.shape[0]) % P, config.n_routed_experts, nodes, gpus)
    return {k: float(v.float().mean()) for k, v in rows.items()} | {"max_nodes": int(rows["nodes_reached"].max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deepseek-v3")
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--tokens-per-rank", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    config = ModelConfig.preset(a.model)
    D = config.hidden_size
    fp8_row, bf16_row, combine_row = D + 4 * (-(-D // 128)), 2 * D, 2 * D
    plan = routing_plan(a.model, a.nodes, a.gpus_per_node)
    rows = []
    for label, cfg in (("group-limited", config),
                       ("no limit", config.replace(n_group=1, topk_group=1))):
        m = measure(cfg, a.nodes, a.gpus_per_node, a.tokens_per_rank, a.seed)
        planned = plan["limited"] if cfg.n_group > 1 else plan["unlimited"]
        for name, key, plan_bytes in (("direct", "direct", planned["naive_inter_node_bytes_per_token"]),
                                      ("two-hop", "two_hop", planned["inter_node_bytes_per_token"])):
            inter = m[f"{key}_inter"]
            row = {"routing": label, "dispatcher": name, "max_nodes": m["max_nodes"],
                   "inter_rows": inter, "intra_rows": m[f"{key}_intra"],
                   "inter_bytes_fp8": inter * (fp8_row + combine_row),
                   "inter_bytes_bf16": inter * (bf16_row + combine_row), "planner_bytes": plan_bytes}
            row["ratio"] = row["inter_bytes_fp8"] / plan_bytes
            rows.append(row)
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{a.model}: {config.n_routed_experts} experts, top-{config.num_experts_per_tok}, "
          f"{config.n_group} groups / top-{config.topk_group}, D = {D}; {a.nodes} nodes x {a.gpus_per_node} GPUs, "
          f"{a.tokens_per_rank * a.nodes * a.gpus_per_node} tokens; bytes per token per MoE layer")
    print(f"{'routing':14} {'dispatch':9} {'nodes<=':>7} {'IB rows':>8} {'NVL rows':>8} {'IB KB fp8':>10} "
          f"{'IB KB bf16':>10} {'planner KB':>10} {'ratio':>6}")
    for r in rows:
        print(f"{r['routing']:14} {r['dispatcher']:9} {r['max_nodes']:>7} {r['inter_rows']:>8.2f} "
              f"{r['intra_rows']:>8.2f} {r['inter_bytes_fp8'] / 1e3:>10.1f} {r['inter_bytes_bf16'] / 1e3:>10.1f} "
              f"{r['planner_bytes'] / 1e3:>10.1f} {r['ratio']:>6.3f}")


if __name__ == "__main__":
    main()
