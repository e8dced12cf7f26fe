"""Rows each dispatcher sends, counted from a routing alone (no processes): the byte counters' formula.

For token t on source rank s = (n_s, g_s) of an EP group of N nodes x G GPUs, E experts (L = E/(NG)
per rank), chosen experts e_1..e_K on ranks p_k = e_k // L, nodes n_k = p_k // G:

    direct     inter rows = #{k : n_k != n_s}              intra rows = #{k : n_k = n_s, p_k != s}
    two-hop    inter rows = #{distinct n_k} - [n_s in {n_k}]                   (hop 1: once per node)
               intra rows = sum over distinct n of #{distinct p_k on n : gpu(p_k) != g_s}   (hop 2)

Rows to oneself cross no link and are not counted. A dispatch row is D x (2 for BF16 | 1 + 4/128
for FP8 with its float32 scales); a combine row sends back the expert output, D x 2 (BF16); the
combine retraces the dispatch, so its rows equal the dispatch's. The dispatchers' TrafficCounter
counts the same rows while it runs (tests/test_parallel_ep.py checks both on one routing), and
`moeco.plan.routing` predicts the two-hop inter-node figure by sampling (its `remote_nodes`).
"""

from __future__ import annotations

import torch


def rows_per_token(indices_TK: torch.Tensor, src_rank_T: torch.Tensor, n_experts: int, nodes: int,
                   gpus_per_node: int) -> dict[str, torch.Tensor]:
    """Per token: direct and two-hop rows sent inside and between nodes (int64 tensors of shape (T,))."""
    P = nodes * gpus_per_node
    L = n_experts // P
    rank_TK = indices_TK.long() // L
    node_TK = rank_TK // gpus_per_node
    src = src_rank_T.long()[:, None]
    src_node = src // gpus_per_node
    T = indices_TK.shape[0]
    direct_inter = (node_TK != src_node).sum(1)
    direct_intra = ((node_TK == src_node) & (rank_TK != src)).sum(1)
    reach_TN = torch.zeros(T, nodes, dtype=torch.bool).scatter_(1, node_TK, True)
    hop1 = reach_TN.sum(1) - reach_TN.gather(1, src_node).long().squeeze(1)
    ranks_TP = torch.zeros(T, P, dtype=torch.bool).scatter_(1, rank_TK, True)
    gpu_P = torch.arange(P) % gpus_per_node
    hop2 = (ranks_TP & (gpu_P[None, :] != (src % gpus_per_node))).sum(1)
    return {"direct_inter": direct_inter, "direct_intra": direct_intra, "two_hop_inter": hop1,
            "two_hop_intra": hop2, "nodes_reached": reach_TN.sum(1)}


def planner_rows(config, nodes: int, gpus_per_node: int, dispatcher: str, samples: int = 4096) -> float | None:
    """The planner's inter-node rows per token for this layout under balanced random routing: remote
    nodes (two-hop) or remote expert copies (direct); None where the planner cannot model it."""
    from moeco.errors import ConfigError
    from moeco.plan.routing import sample_node_limited

    E, K = config.n_routed_experts, config.num_experts_per_tok
    grouped = config.topk_method != "greedy" and config.n_group > 1
    if grouped and config.n_group != nodes:
        return None  # the planner models one routing group per node
    max_nodes = config.topk_group if grouped else nodes
    try:
        s = sample_node_limited(E, K, nodes, gpus_per_node, max(1, max_nodes), samples)
    except ConfigError:
        return None
    return s["remote_nodes"] if dispatcher == "two_hop" else s["remote_expert_copies"]
