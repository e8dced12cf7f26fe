"""Node-limited routing, sampled: how many nodes a token's experts land on, and what crosses IB.

Setup (TR §2.1.2, ISCA §4.3): E routed experts spread in contiguous blocks over N nodes x G GPUs;
each token picks K experts. Node-limited routing first keeps the M nodes with the largest sum of
their top-(K/M) affinities, then takes the top-K experts inside those nodes:

    s        = sigmoid(u)                     u ~ N(0, 1) i.i.d. per token and expert: a balanced load
    node_n   = sum of the top-max(1, K//M) s over the experts on node n
    allowed  = top-M nodes by node_n;  experts = top-K of s over the allowed nodes
    M = N is plain top-K (no limit).

Traffic per token, with c = d (b_dispatch + b_combine) bytes per copy (FP8 out, BF16 back). The
token starts on a random GPU (rank r of its node). With NVLink forwarding (DeepEP), it crosses IB
once per remote target node, landing on GPU r there, and NVLink carries it on to every other target
GPU:

    IB bytes      = c x (distinct target nodes other than its own)      ISCA: "M t" instead of "8 t"
    naive IB      = c x (target experts on other nodes)                 no forwarding
    NVLink bytes  = c x (distinct target GPUs whose local rank != r)
    time/token    = max(IB bytes / B_inter, NVLink bytes / B_intra)     the two pipelines overlap

With NVLink ~3.2x IB (160 vs 50 GB/s, TR §3.2.2) a token may reach ~3.2 experts per node for the
price of one IB copy, so at M = 4 it could select up to 4 x 3.2 = 12.8 experts at the same cost;
DeepSeek-V3 (K = 8, EP64 on 8 nodes) keeps M = 4. The sweep shows the trade: on 8 nodes x 8 H800,
M = 4 cuts IB bytes per token from 99.4 KB (no limit, forwarded) to 74.4 KB (150 KB without
forwarding) and NVLink stays off the critical path (IB-bound from M = 3 up); only at M <= 2 would
NVLink become the bottleneck, at the price of a much narrower choice of experts.

Sampling is seeded; the same arguments give the same numbers.
"""

from __future__ import annotations

import numpy as np

from moeco.errors import ConfigError
from moeco.plan.arch import load_arch


def _distinct(values: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Per row: the number of distinct values (optionally only those where `keep` is true)."""
    order = np.argsort(values, axis=1, kind="stable")
    v = np.take_along_axis(values, order, axis=1)
    first = np.ones_like(v, dtype=bool)
    first[:, 1:] = v[:, 1:] != v[:, :-1]
    if keep is not None:
        first &= np.take_along_axis(keep, order, axis=1)
    return first.sum(axis=1)


def _check_layout(n_experts: int, k: int, nodes: int, gpus_per_node: int, max_nodes: int) -> None:
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes = {nodes} and --gpus-per-node = {gpus_per_node} must be >= 1")
    if n_experts % nodes:
        raise ConfigError(f"--nodes = {nodes} must divide the {n_experts} routed experts into equal blocks")
    if not 1 <= max_nodes <= nodes:
        raise ConfigError(f"--max-nodes = {max_nodes} is invalid: must be between 1 and --nodes = {nodes}")
    if max_nodes * (n_experts // nodes) < k:
        raise ConfigError(f"--max-nodes = {max_nodes} allows only {max_nodes * (n_experts // nodes)} experts, "
                          f"fewer than the {k} each token needs")


def node_limited_topk(scores: np.ndarray, nodes: int, k: int, max_nodes: int) -> np.ndarray:
    """[T, E] affinities -> [T, K] chosen experts: top-M nodes by their top-(K/M) sum, then top-K inside."""
    samples, n_experts = scores.shape
    if max_nodes < nodes:
        top = max(1, k // max_nodes)
        blocks = scores.reshape(samples, nodes, n_experts // nodes)
        node_score = np.sort(blocks, axis=-1)[..., -top:].sum(-1)  # [T, N]
        keep_nodes = np.argsort(-node_score, axis=1, kind="stable")[:, :max_nodes]  # [T, M]
        allowed = np.zeros((samples, nodes), dtype=bool)
        np.put_along_axis(allowed, keep_nodes, True, axis=1)
        node_of = np.arange(n_experts) * nodes // n_experts  # [E]
        scores = np.where(allowed[:, node_of], scores, -np.inf)
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def sample_node_limited(n_experts: int, k: int, nodes: int, gpus_per_node: int, max_nodes: int,
                        samples: int = 8192, seed: int = 0) -> dict:
    """Mean distinct/remote nodes, remote expert copies and NVLink copies per token."""
    _check_layout(n_experts, k, nodes, gpus_per_node, max_nodes)
    if samples < 1:
        raise ConfigError(f"samples = {samples} is invalid: must be >= 1")
    rng = np.random.default_rng(seed)
    scores = 1.0 / (1.0 + np.exp(-rng.standard_normal((samples, n_experts))))  # [T, E]
    node_of = np.arange(n_experts) * nodes // n_experts  # [E]
    gpu_of = np.arange(n_experts) * (nodes * gpus_per_node) // n_experts  # [E]
    src_node = rng.integers(0, nodes, samples)  # [T]
    src_rank = rng.integers(0, gpus_per_node, samples)  # [T]

    chosen = node_limited_topk(scores, nodes, k, max_nodes)  # [T, K]
    c_node = node_of[chosen]
    c_gpu = gpu_of[chosen]
    remote = c_node != src_node[:, None]
    distinct_nodes = _distinct(c_node)
    remote_nodes = _distinct(c_node, remote)
    nvlink_copies = _distinct(c_gpu, (c_gpu % gpus_per_node) != src_rank[:, None])
    return {
        "max_nodes": max_nodes,
        "distinct_nodes": float(distinct_nodes.mean()),
        "max_distinct_nodes": int(distinct_nodes.max()),
        "remote_nodes": float(remote_nodes.mean()),
        "remote_expert_copies": float(remote.sum(axis=1).mean()),
        "nvlink_copies": float(nvlink_copies.mean()),
    }


def expected_distinct_nodes_uniform(n_experts: int, k: int, nodes: int) -> float:
    """Closed form for plain top-K under a balanced load: N (1 - C(E - E/N, K) / C(E, K))."""
    from math import comb

    return nodes * (1 - comb(n_experts - n_experts // nodes, k) / comb(n_experts, k))


def routing_plan(model, nodes: int, gpus_per_node: int, max_nodes: int | None = None,
                 intra_bw_gbs: float = 160, inter_bw_gbs: float = 50, tokens_per_gpu: int = 4096,
                 dispatch_bytes: float = 1, combine_bytes: float = 2, samples: int = 8192, seed: int = 0) -> dict:
    a = load_arch(model)
    if not a.is_moe:
        raise ConfigError(f"routing needs an MoE model; {a.name} has no routed experts")
    if intra_bw_gbs <= 0 or inter_bw_gbs <= 0:
        raise ConfigError("--intra-bw and --inter-bw must be positive (GB/s)")
    if tokens_per_gpu < 1:
        raise ConfigError(f"--tokens-per-gpu = {tokens_per_gpu} is invalid: must be >= 1")
    if max_nodes is None:
        max_nodes = a.topk_group if a.n_group == nodes and a.n_group > 1 else min(4, nodes)
    _check_layout(a.n_routed_experts, a.num_experts_per_tok, nodes, gpus_per_node, max_nodes)
    copy_bytes = a.hidden_size * (dispatch_bytes + combine_bytes)
    sweep = []
    for m in range(1, nodes + 1):
        if m * (a.n_routed_experts // nodes) < a.num_experts_per_tok:
            continue  # too few experts on m nodes
        s = sample_node_limited(a.n_routed_experts, a.num_experts_per_tok, nodes, gpus_per_node, m,
                                samples, seed)
        ib = s["remote_nodes"] * copy_bytes
        nvl = s["nvlink_copies"] * copy_bytes
        t_ib = ib / (inter_bw_gbs * 1e9) * 1e6 * tokens_per_gpu
        t_nvl = nvl / (intra_bw_gbs * 1e9) * 1e6 * tokens_per_gpu
        sweep.append({**s, "inter_node_bytes_per_token": ib,
                      "naive_inter_node_bytes_per_token": s["remote_expert_copies"] * copy_bytes,
                      "nvlink_bytes_per_token": nvl, "ib_time_us": t_ib, "nvlink_time_us": t_nvl,
                      "time_us": max(t_ib, t_nvl), "bottleneck": "IB" if t_ib >= t_nvl else "NVLink"})
    by_m = {row["max_nodes"]: row for row in sweep}
    limited, unlimited = by_m[max_nodes], by_m[nodes]
    ratio = intra_bw_gbs / inter_bw_gbs
    return {
        "model": a.name, "nodes": nodes, "gpus_per_node": gpus_per_node, "max_nodes": max_nodes,
        "experts_per_token": a.num_experts_per_tok, "routed_experts": a.n_routed_experts,
        "intra_bw_gbs": intra_bw_gbs, "inter_bw_gbs": inter_bw_gbs, "tokens_per_gpu": tokens_per_gpu,
        "bytes_per_copy": copy_bytes, "samples": samples, "seed": seed,
        "limited": limited, "unlimited": unlimited,
        "distinct_nodes_limited": limited["distinct_nodes"],
        "distinct_nodes_unlimited": unlimited["distinct_nodes"],
        "inter_node_bytes_limited": limited["inter_node_bytes_per_token"],
        "inter_node_bytes_unlimited": unlimited["inter_node_bytes_per_token"],
        "time_us_limited": limited["time_us"],
        "time_us_unlimited": unlimited["time_us"],
        "nvlink_to_ib_ratio": ratio,
        "experts_per_node_free": ratio,
        "max_experts_same_ib_cost": max_nodes * ratio,
        "sweep": sweep,
    }
