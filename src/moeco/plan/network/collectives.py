"""Collectives as flow sets: all-to-all, ring and tree all-gather / reduce-scatter, MoE dispatch/combine.

A collective is one or more phases; a phase is a set of transfers (src GPU, dst GPU, bytes) that run
at the same time, and it pays `steps` latencies. S is NCCL's message size: the per-rank output of
all-gather, the per-rank input of reduce-scatter and all-to-all. Groups of K GPUs run at once.

    all-to-all          1 phase: every a -> b (a != b) of the group carries S / K;  steps 1
    ring AG / RS        1 phase: member j -> j+1 carries (K-1) S / K (the ring streams every chunk
                        through each connection: K-1 steps of S/K, pipelined);   steps K-1
    tree AG / RS        recursive doubling / halving, K a power of two: log2 K phases, phase i
                        exchanges S 2^i / K with member j XOR 2^i;               steps 1 each
    reduce-scatter      the same traffic as all-gather, reversed (the reduction's compute is not modelled)

Bus bandwidth (NCCL's convention, per GPU): algbw = S / time, busbw = algbw (K-1) / K for all three,
which makes busbw comparable to a link's speed whatever K is.

TP groups (`tp = K`): K GPUs that sit on K different nodes, one per node, at the same local rank,
nodes spread evenly over the cluster (member m of the group of node j is on node j + m N/K). That is
the placement whose all-gather / reduce-scatter crosses the scale-out network, the question here;
a TP group inside one node never leaves NVLink.

MoE dispatch (DeepEP's high-throughput kernels): each GPU routes T tokens to K experts with the
node-limited rule of `moeco.plan.routing` (E experts in contiguous blocks over the GPUs); a token
crosses the network once per distinct remote target node, to the GPU of its own local rank there,
and NVLink carries it on to each target GPU of that node; targets in its own node go over NVLink.
Dispatch carries hidden x (1 + 4/128) B per copy (FP8 + a float scale per 128), combine the same
copies back in BF16 (2 hidden B). Routing is sampled (`samples` tokens per GPU) and scaled to T.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moeco.errors import ConfigError
from moeco.plan.network.graph import Network

COLLECTIVES = ("all-to-all", "all-gather", "reduce-scatter", "dispatch", "combine")
ALGORITHMS = ("ring", "tree")


@dataclass
class Phase:
    src: np.ndarray  # [T] int
    dst: np.ndarray  # [T] int
    nbytes: np.ndarray  # [T] float
    steps: int  # latencies this phase pays


def groups(net: Network, tp: int | None) -> list[list[int]]:
    """All GPUs as one group, or TP groups of `tp` GPUs on `tp` different nodes (see the header)."""
    if tp is None:
        return [list(range(net.gpus))]
    if tp < 2 or net.nodes % tp:
        raise ConfigError(f"--tp = {tp} is invalid: TP groups span tp nodes, so tp must be >= 2 and divide the "
                          f"{net.nodes} nodes")
    stride = net.nodes // tp
    out = []
    for first in range(stride):
        for r in range(net.gpus_per_node):
            out.append([net.gpu(first + m * stride, r) for m in range(tp)])
    return out


def _cat(parts: list[tuple[list, list, list]], steps: int) -> Phase:
    src = np.array([x for p in parts for x in p[0]], dtype=np.int64)
    dst = np.array([x for p in parts for x in p[1]], dtype=np.int64)
    nb = np.array([x for p in parts for x in p[2]], dtype=float)
    return Phase(src, dst, nb, steps)


def all_to_all(members_list: list[list[int]], message_bytes: float) -> list[Phase]:
    parts = []
    for m in members_list:
        k = len(m)
        a, b = np.meshgrid(m, m, indexing="ij")
        keep = a != b
        parts.append((a[keep].tolist(), b[keep].tolist(), [message_bytes / k] * int(keep.sum())))
    return [_cat(parts, 1)]


def ring(members_list: list[list[int]], message_bytes: float) -> list[Phase]:
    parts = []
    for m in members_list:
        k = len(m)
        parts.append((m, m[1:] + m[:1], [(k - 1) * message_bytes / k] * k))
    return [_cat(parts, max(len(m) for m in members_list) - 1)]


def tree(members_list: list[list[int]], message_bytes: float) -> list[Phase]:
    k = len(members_list[0])
    if k & (k - 1):
        raise ConfigError(f"--algorithm tree needs a power-of-two group; this group has {k} GPUs (use ring)")
    phases = []
    for i in range(int(math.log2(k))):
        parts = []
        for m in members_list:
            partner = [m[j ^ (1 << i)] for j in range(k)]
            parts.append((m, partner, [message_bytes * (1 << i) / k] * k))
        phases.append(_cat(parts, 1))
    return phases


def moe_traffic(net: Network, n_experts: int, top_k: int, hidden: int, tokens_per_gpu: int, max_nodes: int,
                samples: int = 256, seed: int = 0, combine: bool = False) -> tuple[list[Phase], dict]:
    """DeepEP-style dispatch (or combine) of every GPU's tokens; returns the phase and byte counts."""
    from moeco.plan.routing import _check_layout, node_limited_topk

    n, g = net.nodes, net.gpus_per_node
    _check_layout(n_experts, top_k, n, g, max_nodes)
    if n_experts % net.gpus:
        raise ConfigError(f"{n_experts} experts do not split evenly over {net.gpus} GPUs; choose --gpus dividing it")
    rng = np.random.default_rng(seed)
    copy_bytes = hidden * (2.0 if combine else 1 + 4 / 128)
    scale = tokens_per_gpu / samples
    gpu_of = np.arange(n_experts) * net.gpus // n_experts
    pair_bytes = np.zeros((net.gpus, net.gpus))
    remote_pairs = all_pairs = 0.0
    for s in range(net.gpus):
        scores = 1.0 / (1.0 + np.exp(-rng.standard_normal((samples, n_experts))))
        chosen = node_limited_topk(scores, n, top_k, max_nodes)  # [T, K]
        hit = np.zeros((samples, net.gpus), dtype=bool)
        np.put_along_axis(hit, gpu_of[chosen], True, axis=1)  # [T, GPUs] target GPUs
        node_hit = hit.reshape(samples, n, g).any(-1)  # [T, N] target nodes
        sn, sr = net.node_of(s), s % g
        for node in range(n):
            tokens = node_hit[:, node]
            count = tokens.sum() * scale
            all_pairs += count
            entry = s if node == sn else net.gpu(node, sr)  # where the token enters that node
            if node != sn:
                remote_pairs += count
                pair_bytes[s, entry] += count * copy_bytes
            per_gpu = hit[tokens][:, node * g:(node + 1) * g].sum(0) * scale  # [G] copies per target GPU
            for r in range(g):
                if net.gpu(node, r) != entry:
                    pair_bytes[entry, net.gpu(node, r)] += per_gpu[r] * copy_bytes
    src, dst = np.nonzero(pair_bytes)
    nb = pair_bytes[src, dst]
    if combine:
        src, dst = dst, src
    bytes_info = {"inter_node_bytes_per_gpu": remote_pairs * copy_bytes / net.gpus,
                  "node_copies_bytes_per_gpu": all_pairs * copy_bytes / net.gpus,
                  "copy_bytes": copy_bytes}
    return [Phase(src, dst, nb, 1)], bytes_info


def collective_phases(net: Network, collective: str, message_bytes: float, tp: int | None,
                      algorithm: str) -> tuple[list[Phase], int]:
    """Phases of a collective and its group size K (for the bus-bandwidth factor)."""
    if collective not in COLLECTIVES[:3]:
        raise ConfigError(f"--collective = {collective!r} is invalid: choose one of {', '.join(COLLECTIVES)}")
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"--algorithm = {algorithm!r} is invalid: choose ring or tree")
    if message_bytes <= 0:
        raise ConfigError(f"--message-bytes = {message_bytes:g} is invalid: must be > 0")
    members = groups(net, tp)
    k = len(members[0])
    if k < 2:
        raise ConfigError("a collective needs at least 2 GPUs; raise --gpus")
    if collective == "all-to-all":
        return all_to_all(members, message_bytes), k
    return (ring if algorithm == "ring" else tree)(members, message_bytes), k
