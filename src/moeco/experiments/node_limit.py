"""`moeco experiment node-limit`: inter-node traffic and quality of node-limited routing, from a trained router.

DeepSeek-V3 (TR section 2.1.2, ISCA section 4.3): with the routed experts spread over N nodes, each
token may reach at most M nodes, chosen by the sum of the top affinities per node; with NVLink
forwarding a token then crosses the inter-node network M times at most instead of up to K (8 at V3's
K = 8), for a small loss in the choice of experts (V3: M = 4 of 8 nodes).

Setup: the trained model's E routed experts laid out contiguously on N nodes (E/N per node, one
router group per node); M = ceil(K / (E/N)) .. N (M nodes must hold K experts) by setting every
router's (n_group, topk_group) = (N, M), M = N being unrestricted top-K. The router is the model's
own (DeepSeek's rule: a node scores the sum of its top-2 selection scores s + b). Each held-out token starts on a random node (seeded). Per token
and MoE layer:

    IB copies        = distinct target nodes other than its own      (NVLink forwarding, as DeepEP)
    naive IB copies  = target experts on other nodes                 (no forwarding)
    bytes            = IB copies x hidden x (1 B FP8 dispatch + 2 B BF16 combine)

and bytes per training step = bytes per token x MoE layers x tokens per step (batch x seq_len).
Quality: the held-out loss of the same model routed with each M (inference only: the model was
trained with its own group limit, so this is the cost of imposing M afterwards, an upper bound on
the cost of training with it).
"""

from __future__ import annotations

import torch

from moeco.errors import ConfigError
from moeco.experiments import common

NAME = "node-limit"


def add_args(p) -> None:
    common.add_common_args(p, steps=40)
    common.add_run_arg(p)
    p.add_argument("--nodes", type=int, default=8, help="nodes the experts are spread over (default 8, as V3)")
    p.add_argument("--max-seqs", type=int, default=32, help="held-out sequences to route (default 32)")


@torch.no_grad()
def routed_experts(model, val_BS) -> tuple[list[tuple[int, torch.Tensor]], float]:
    """(layer, indices (T, K)) of every router call on the held-out sequences, in call order (batches
    of `common.val_loss`, tokens sequence-major), and the held-out loss; the model routes as it is."""
    captured = []
    hooks = [moe.gate.register_forward_hook(lambda mod, inp, out, i=i: captured.append((i, out.indices_TK.cpu())))
             for i, moe in model.moe_layers()]
    try:
        loss = common.val_loss(model, val_BS)
    finally:
        for h in hooks:
            h.remove()
    return captured, loss


@torch.no_grad()
def route_with_limit(model, val_BS, nodes: int, m: int) -> tuple[list[torch.Tensor], float]:
    """Indices (T, K) chosen in every MoE layer with the node limit M, and the held-out loss."""
    saved = []
    for _, moe in model.moe_layers():
        gate = moe.gate
        saved.append((gate.n_group, gate.topk_group, gate.topk_method))
        gate.n_group, gate.topk_group = nodes, m
        if gate.topk_method == "greedy":
            gate.topk_method = "group_limited_greedy"
    try:
        captured, loss = routed_experts(model, val_BS)
    finally:
        for (_, moe), (g, k, method) in zip(model.moe_layers(), saved):
            moe.gate.n_group, moe.gate.topk_group, moe.gate.topk_method = g, k, method
    return [idx for _, idx in captured], loss


def traffic(indices: list[torch.Tensor], experts_per_node: int, nodes: int, seed: int = 0) -> dict:
    ib, naive, distinct = [], [], []
    gen = torch.Generator().manual_seed(seed)
    for idx in indices:
        node_TK = idx // experts_per_node
        src = torch.randint(0, nodes, (idx.shape[0], 1), generator=gen)
        onehot = torch.zeros(idx.shape[0], nodes, dtype=torch.bool).scatter_(1, node_TK, True)
        distinct.append(onehot.sum(1).float())
        ib.append((onehot.sum(1) - onehot.gather(1, src).squeeze(1).long()).float())
        naive.append((node_TK != src).sum(1).float())
    cat = torch.cat
    return {"nodes_per_token": cat(distinct).mean().item(), "ib_copies": cat(ib).mean().item(),
            "naive_ib_copies": cat(naive).mean().item()}


def run(args) -> dict:
    common.check_positive(args, "nodes", "max_seqs")
    cfg = common.planned_model_config(args)
    E = cfg.n_routed_experts
    if E % args.nodes:
        raise ConfigError(f"--nodes {args.nodes} is invalid: it must divide the {E} routed experts "
                          f"(e.g. --nodes {max(d for d in range(1, 9) if E % d == 0)})")
    per_node, K = E // args.nodes, cfg.num_experts_per_tok
    if per_node < 2 and cfg.topk_method == "noaux_tc":
        raise ConfigError(f"--nodes {args.nodes} is invalid: a node needs at least 2 of the {E} experts "
                          f"(its score is the sum of its top 2); use --nodes {E // 2} or fewer")
    out = common.out_dir(args, NAME)
    trained = common.load_run(common.base_run(args, out), max_val=args.max_seqs)
    model, cfg = trained.model, trained.model.config
    m_min = -(-K // per_node)  # M nodes must hold at least K experts
    n_moe = sum(1 for _ in model.moe_layers())
    tokens_per_step = args.batch_size * args.seq_len
    results = {}
    for m in range(m_min, args.nodes + 1):
        idx, loss = route_with_limit(model, trained.val_BS, args.nodes, m)
        t = traffic(idx, E // args.nodes, args.nodes)
        per_token = t["ib_copies"] * cfg.hidden_size * 3
        results[m] = {**t, "val_loss": loss, "ib_bytes_per_token_layer": per_token,
                      "ib_bytes_per_step": per_token * n_moe * tokens_per_step}
    free = results[args.nodes]
    for r in results.values():
        r["ib_vs_unrestricted"] = r["ib_copies"] / free["ib_copies"] if free["ib_copies"] else None
        r["loss_cost"] = r["val_loss"] - free["val_loss"]
    rows = [[m if m < args.nodes else f"{m} (no limit)", r["nodes_per_token"], r["ib_copies"], r["naive_ib_copies"],
             r["ib_vs_unrestricted"], r["ib_bytes_per_step"] / 1e6, r["val_loss"], r["loss_cost"]]
            for m, r in results.items()]
    plt = common.pyplot()
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    ms = list(results)
    ax[0].plot(ms, [results[m]["ib_copies"] for m in ms], "o-", label="IB copies (NVLink forwarding)")
    ax[0].plot(ms, [results[m]["naive_ib_copies"] for m in ms], "s--", label="IB copies (no forwarding)")
    ax[0].set_ylabel("inter-node copies per token per MoE layer")
    ax[0].set_title(f"traffic: {E} experts on {args.nodes} nodes, top-{cfg.num_experts_per_tok}")
    ax[1].plot(ms, [results[m]["val_loss"] for m in ms], "o-")
    ax[1].set_ylabel("held-out loss (nats)")
    ax[1].set_title("quality when routed with the limit (inference)")
    for a in ax:
        a.set_xlabel("M (max nodes per token)")
        a.grid(alpha=0.3)
    ax[0].legend(fontsize="small")
    title = (f"Node-limited routing from {trained.path}'s router ({n_moe} MoE layers, hidden {cfg.hidden_size}, "
             f"{tokens_per_step} tokens/step)")
    columns = ["M", "nodes/token", "IB copies/token", "without forwarding", "vs no limit", "IB MB/step",
               "held-out loss", "loss vs no limit"]
    return common.finish(out, NAME, [(title, columns, rows)],
                         {"results": results, "nodes": args.nodes, "experts": E,
                          "top_k": cfg.num_experts_per_tok}, fig)
