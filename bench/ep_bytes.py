"""Bytes between nodes per token, direct vs two-hop dispatch, against moeco's planner.

    python bench/ep_bytes.py                                   # DeepSeek-V3 on 8 nodes x 8 GPUs
    python bench/ep_bytes.py --model small --nodes 8 --gpus-per-node 1
    python bench/ep_bytes.py --run runs/small                  # a trained model's routing on held-out text

Random routing (always): moeco's Router of the model (group-limited top-K, `topk_group` of `n_group`
groups, one group per node) with random weights on random inputs: a balanced load, as the planner
assumes; and the same router without the group limit (n_group = 1) for contrast. Each token starts on
a rank (t mod N G).

Trained routing (`--run DIR`, a `moeco train` run directory): the run's final model (float32, on CUDA
when there is one) reads the run's held-out sequences, the validation split of its training text
(the embedded corpus by default) tokenized with the run's own tokenizer (`experiments.common.load_run`),
and every MoE layer's router as trained (its bias, its group limit) picks the experts for the hidden
states it gets (`experiments.node_limit.routed_experts`). Sequence i starts on rank i mod N G, as
data-parallel ranks hold whole sequences. The experts lie as the planner lays them out: E experts in
contiguous blocks over --nodes x --gpus-per-node (default for a run: one node per routing group, as
V3 trains, so its group limit is a node limit, and up to 8 GPUs per node). Reported per MoE layer and
averaged over layers, next to random routing of the same config: what a trained router's imbalance
and correlations (the tokens of one sequence, experts that fire together) do to the traffic.

Rows are counted by `moeco.parallel.traffic.rows_per_token`, the formula the dispatchers' byte
counters follow (the tests check the two agree on a real 4-process run). Bytes per token and MoE layer:

    inter = inter rows x (dispatch row + combine row),  dispatch row = D (FP8: + 4 D/128 scales) or 2 D (BF16),
    combine row = 2 D (BF16)

The planner (`moeco.plan.routing.routing_plan`, 1 byte + 2 bytes per element) samples the same
layout under balanced random routing: its `naive` figure is one copy per remote expert (the direct
dispatcher), its forwarded figure one copy per remote node (two-hop). The ratio measured / planner is
printed for both ("-" where the planner cannot model the routing: groups that are not whole nodes).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from moeco.config import ModelConfig
from moeco.errors import MoecoError
from moeco.model.moe import Router
from moeco.parallel.traffic import rows_per_token
from moeco.plan.routing import routing_plan

DISPATCHERS = (("direct", "direct", "naive_inter_node_bytes_per_token"),
               ("two-hop", "two_hop", "inter_node_bytes_per_token"))


def random_routing(config: ModelConfig, ranks: int, tokens_per_rank: int, seed: int) -> torch.Tensor:
    """Expert ids (T, K) from the model's Router with random weights on random inputs."""
    torch.manual_seed(seed)
    router = Router(config)
    torch.nn.init.normal_(router.weight, std=config.initializer_range)
    x = torch.randn(ranks * tokens_per_rank, config.hidden_size)
    with torch.no_grad():
        return router.eval()(x).indices_TK


def trained_routing(run: str, max_seqs: int) -> tuple[ModelConfig, dict[int, torch.Tensor], int, float]:
    """The run's config, each MoE layer's expert ids (T, K) on its held-out tokens, tokens per sequence,
    and the held-out loss."""
    from moeco.experiments import common
    from moeco.experiments.node_limit import routed_experts

    trained = common.load_run(common.base_run(argparse.Namespace(run=run), None), max_val=max_seqs)
    if len(trained.val_BS) == 0:
        raise MoecoError(f"--run {run!r} has no held-out sequences to route")
    model = trained.model  # on the GPU when there is one
    captured, loss = routed_experts(model, trained.val_BS)
    by_layer: dict[int, list] = {}
    for layer, idx in captured:
        by_layer.setdefault(layer, []).append(idx)
    return model.config, {i: torch.cat(v) for i, v in by_layer.items()}, trained.val_BS.shape[1] - 1, loss


def mean_rows(idx_TK: torch.Tensor, src_rank_T: torch.Tensor, n_experts: int, nodes: int, gpus: int) -> dict:
    rows = rows_per_token(idx_TK.cpu(), src_rank_T, n_experts, nodes, gpus)
    return {k: float(v.float().mean()) for k, v in rows.items()} | {"max_nodes": int(rows["nodes_reached"].max())}


def planner_bytes(plan: dict, config: ModelConfig, nodes: int) -> dict | None:
    """The planner's sample for this routing: limited (one group per node) or unlimited; None if neither."""
    if config.topk_method == "greedy" or config.n_group == 1:
        return plan["unlimited"]
    return plan["limited"] if config.n_group == nodes else None


def table_rows(label: str, layer, m: dict, planned: dict | None, D: int) -> list[dict]:
    fp8_row, bf16_row, combine_row = D + 4 * (-(-D // 128)), 2 * D, 2 * D
    out = []
    for name, key, plan_key in DISPATCHERS:
        inter = m[f"{key}_inter"]
        row = {"routing": label, "layer": layer, "dispatcher": name, "max_nodes": m["max_nodes"],
               "inter_rows": inter, "intra_rows": m[f"{key}_intra"],
               "inter_bytes_fp8": inter * (fp8_row + combine_row), "inter_bytes_bf16": inter * (bf16_row + combine_row),
               "planner_bytes": planned[plan_key] if planned else None}
        row["ratio"] = row["inter_bytes_fp8"] / row["planner_bytes"] if planned else None
        out.append(row)
    return out


def default_layout(config: ModelConfig, nodes: int | None, gpus: int | None, run: bool) -> tuple[int, int]:
    """--nodes / --gpus-per-node, or the defaults: V3's 8 x 8; for a run, a node per routing group and
    the most GPUs (up to 8) that split a node's experts evenly."""
    E = config.n_routed_experts
    if nodes is None:
        nodes = config.n_group if run and config.n_group > 1 else 8
    if gpus is None:
        gpus = 8 if not run else max(g for g in range(1, 9) if E % nodes == 0 and (E // nodes) % g == 0)
    if E % (nodes * gpus):
        raise MoecoError(f"--nodes {nodes} x --gpus-per-node {gpus} = {nodes * gpus} ranks do not split the "
                         f"{E} routed experts evenly; choose a layout whose rank count divides {E}")
    return nodes, gpus


def measure(a) -> dict:
    run_info = None
    if a.run:
        config, layers, seq_len, loss = trained_routing(a.run, a.max_seqs)
        run_info = {"run": a.run, "held_out_loss": loss, "sequences": next(iter(layers.values())).shape[0] // seq_len,
                    "tokens_per_layer": next(iter(layers.values())).shape[0], "moe_layers": len(layers)}
    else:
        config = ModelConfig.preset(a.model)
    nodes, gpus = default_layout(config, a.nodes, a.gpus_per_node, bool(a.run))
    P, E, D = nodes * gpus, config.n_routed_experts, config.hidden_size
    plan = routing_plan(config, nodes, gpus)
    rows = []
    if a.run:
        per_layer = []
        for i, idx in sorted(layers.items()):
            src = (torch.arange(idx.shape[0]) // seq_len) % P
            m = mean_rows(idx, src, E, nodes, gpus)
            per_layer.append(m)
            rows += table_rows("trained", i, m, planner_bytes(plan, config, nodes), D)
        avg = {k: sum(m[k] for m in per_layer) / len(per_layer) for k in per_layer[0] if k != "max_nodes"}
        avg["max_nodes"] = max(m["max_nodes"] for m in per_layer)
        rows += table_rows("trained", "mean", avg, planner_bytes(plan, config, nodes), D)
    for label, cfg in (("random, limited", config), ("random, no limit", config.replace(n_group=1, topk_group=1))):
        idx = random_routing(cfg, P, a.tokens_per_rank, a.seed)
        m = mean_rows(idx, torch.arange(idx.shape[0]) % P, E, nodes, gpus)
        rows += table_rows(label, "-", m, planner_bytes(plan, cfg, nodes), D)
    return {"model": a.run or a.model, "experts": E, "top_k": config.num_experts_per_tok, "n_group": config.n_group,
            "topk_group": config.topk_group, "hidden": D, "nodes": nodes, "gpus_per_node": gpus,
            "random_tokens": P * a.tokens_per_rank, "trained": run_info, "rows": rows}


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="deepseek-v3", help="preset for random routing (ignored with --run)")
    ap.add_argument("--run", metavar="DIR", help="a `moeco train` run directory: route with its trained model")
    ap.add_argument("--max-seqs", type=int, default=64, help="held-out sequences to route with --run (default 64)")
    ap.add_argument("--nodes", type=int, help="nodes (default 8; with --run: the model's n_group)")
    ap.add_argument("--gpus-per-node", type=int, help="GPUs per node (default 8; with --run: up to 8)")
    ap.add_argument("--tokens-per-rank", type=int, default=128, help="random-routing tokens per rank")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    a = ap.parse_args(argv)
    try:
        res = measure(a)
    except MoecoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if a.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{res['model']}: {res['experts']} experts, top-{res['top_k']}, {res['n_group']} groups / "
          f"top-{res['topk_group']}, D = {res['hidden']}; {res['nodes']} nodes x {res['gpus_per_node']} GPUs; "
          f"bytes per token per MoE layer")
    if res["trained"]:
        t = res["trained"]
        print(f"trained routing: {t['sequences']} held-out sequences, {t['tokens_per_layer']} tokens x "
              f"{t['moe_layers']} MoE layers, held-out loss {t['held_out_loss']:.3f}; "
              f"random routing: {res['random_tokens']} tokens")
    print(f"{'routing':17} {'layer':>5} {'dispatch':9} {'nodes<=':>7} {'IB rows':>8} {'NVL rows':>8} {'IB KB fp8':>10} "
          f"{'IB KB bf16':>10} {'planner KB':>10} {'ratio':>6}")
    for r in res["rows"]:
        planner = None if r["planner_bytes"] is None else r["planner_bytes"] / 1e3
        print(f"{r['routing']:17} {r['layer']!s:>5} {r['dispatcher']:9} {r['max_nodes']:>7} {r['inter_rows']:>8.2f} "
              f"{r['intra_rows']:>8.2f} {r['inter_bytes_fp8'] / 1e3:>10.2f} {r['inter_bytes_bf16'] / 1e3:>10.2f} "
              f"{_num(planner, '>10.2f'):>10} {_num(r['ratio'], '>6.3f'):>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
