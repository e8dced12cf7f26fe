"""Path choice: ECMP, adaptive and static routing, NVLink forwarding (PXN), rerouting around failures.

A transfer a -> b between GPUs on different nodes leaves through NIC e and arrives through NIC i:

    ft2, ft3           e = a, i = b (top-of-rack: every NIC of a node on one leaf)
    mpft, mrft + PXN   e = the GPU of a's node on b's rail/plane, i = b: NVLink a -> e first
                       (NCCL's PXN), so the transfer stays on one rail; in mpft it must (planes
                       do not meet), in mrft it is NCCL's choice (`pxn=False` sends a's own NIC
                       across the spines instead)
    failed NIC/plane   another (e, i) pair of live NICs that a live path joins, reached over
                       NVLink inside the node (mpft: the same plane at both ends)

Between leaf(e) and leaf(i) there are P equal-cost up-down paths (graph.py). The routing mode
picks among them, and among the (e, i) alternatives when the preferred pair is down:

    ecmp      the switch hashes each flow onto one path: modelled as a uniform random choice per
              flow, seeded, results averaged over seeds. NCCL opens `channels` connections (QPs)
              per peer, each hashed on its own, so a transfer is `channels` flows.
    adaptive  the switches spread traffic by load (packet-level adaptive routing at its best): each
              transfer is split evenly over all P live paths, which loads equal-cost links equally
    static    a fixed table computed for the job: for two-layer networks, a proper colouring of
              the bipartite multigraph of cross-leaf flows (left: source leaves, right: destination
              leaves; colour = spine), which is collision-free whenever no leaf sends or receives
              more cross-leaf flows than it has spines (Konig's theorem); otherwise, and for ft3,
              destination-mod-k (path = destination's leaf port mod P, the static fat-tree rule),
              which balances uniform all-to-all traffic
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from moeco.errors import ConfigError
from moeco.plan.network.graph import Network, switches_on
from moeco.plan.network.latency import LatencyModel

ROUTING_MODES = ("ecmp", "adaptive", "static")


def _endpoint_pairs(net: Network, a: int, b: int, pxn: bool) -> list[tuple[int, int]]:
    """Usable (egress NIC, ingress NIC) pairs, the preferred one first when it is usable."""
    na, nb = net.node_of(a), net.node_of(b)
    G = net.gpus_per_node
    rails = net.topology == "mpft" or (net.topology == "mrft" and pxn)
    if rails:
        rb = b % G
        preferred = (net.gpu(na, rb), b)
    else:
        preferred = (a, b)

    def usable(e: int, i: int) -> bool:
        return net.nic_alive(e) and net.nic_alive(i) and bool(net.switch_paths(net.leaf_of[e], net.leaf_of[i]))

    if usable(*preferred):
        return [preferred]
    if rails:
        cands = [(net.gpu(na, q), net.gpu(nb, q)) for q in range(G)]
    else:
        ra, rb = a % G, b % G
        es = [net.gpu(na, (ra + j) % G) for j in range(G)]
        is_ = [net.gpu(nb, (rb + j) % G) for j in range(G)]
        # a dead NIC is replaced by the next live one of its node; if that pair has no path, try all pairs
        e_ok = [a] if net.nic_alive(a) else [e for e in es if net.nic_alive(e)][:1]
        i_ok = [b] if net.nic_alive(b) else [i for i in is_ if net.nic_alive(i)][:1]
        cands = [(e, i) for e in e_ok for i in i_ok if usable(e, i)] or [(e, i) for e in es for i in is_]
    return [(e, i) for e, i in cands if usable(e, i)]


def route(net: Network, src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray, mode: str, lat: LatencyModel,
          rng: np.random.Generator, channels: int = 2, pxn: bool = True):
    """Flows for the transfers src[t] -> dst[t] of nbytes[t] bytes.

    Returns (paths per flow, size per flow, transfer of each flow, latency per transfer in us).
    Raises ConfigError when a transfer has no live path (the failure disconnected it).
    """
    if mode not in ROUTING_MODES:
        raise ConfigError(f"--routing = {mode!r} is invalid: choose one of {', '.join(ROUTING_MODES)}")
    flows, sizes, owner = [], [], []
    latency = np.zeros(len(src))
    pending = []  # static: (flow, slot, e, i) awaiting a switch path
    n_sub = channels if mode == "ecmp" else 1
    for t, (a, b, size) in enumerate(zip(src.tolist(), dst.tolist(), nbytes.tolist())):
        if a == b or size <= 0:
            continue
        if net.node_of(a) == net.node_of(b):
            flows.append([((net.nvl_up[a], net.nvl_down[b]), 1.0)])
            sizes.append(size)
            owner.append(t)
            latency[t] = lat.path_us(0, 1)
            continue
        pairs = _endpoint_pairs(net, a, b, pxn)
        if not pairs:
            raise ConfigError(f"GPU {a} cannot reach GPU {b} after the failure: no live NIC pair and path; "
                              "choose a smaller --fail")
        if len(pairs) > 1 and mode == "ecmp":
            pairs = [pairs[rng.integers(len(pairs))]]
        elif len(pairs) > 1 and mode == "static":
            pairs = [pairs[(a + b) % len(pairs)]]
        for _ in range(n_sub):
            entry = []
            for e, i in pairs:
                frac = 1.0 / len(pairs)
                head = (net.nvl_up[a], net.nvl_down[e]) if e != a else ()
                tail = (net.nvl_up[i], net.nvl_down[b]) if i != b else ()
                ends = head + (net.nic_up[e],), (net.nic_down[i],) + tail
                options = net.switch_paths(net.leaf_of[e], net.leaf_of[i])
                hops = (e != a) + (i != b)
                latency[t] = max(latency[t], lat.path_us(switches_on(options[0]), hops))
                if mode == "adaptive":
                    entry += [(ends[0] + p + ends[1], frac / len(options)) for p in options]
                elif mode == "ecmp" or len(options) == 1:
                    p = options[rng.integers(len(options))] if mode == "ecmp" else options[0]
                    entry.append((ends[0] + p + ends[1], frac))
                else:
                    pending.append((len(flows), len(entry), e, i))
                    entry.append((ends, frac))  # switch path filled in below
            flows.append(entry)
            sizes.append(size / n_sub)
            owner.append(t)
    if pending:
        _static_assign(net, flows, pending)
    return flows, sizes, owner, latency


def _static_assign(net: Network, flows: list, pending: list) -> None:
    two_layer = all(len(p) == 2 for (_, _, e, i) in pending[:1]
                    for p in net.switch_paths(net.leaf_of[e], net.leaf_of[i])[:1])
    colour = _colour(net, pending) if two_layer else None
    for n, (f, slot, e, i) in enumerate(pending):
        options = net.switch_paths(net.leaf_of[e], net.leaf_of[i])
        k = colour[n] if colour is not None else net.port_of[i]
        (head, tail), frac = flows[f][slot]
        flows[f][slot] = (head + options[k % len(options)] + tail, frac)


def _colour(net: Network, pending: list) -> list[int] | None:
    """Konig edge colouring of the cross-leaf flows with P colours; None when a leaf has > P of them."""
    P = min(len(net.switch_paths(net.leaf_of[e], net.leaf_of[i])) for (_, _, e, i) in pending)
    edges = [(net.leaf_of[e], net.leaf_of[i]) for (_, _, e, i) in pending]
    out_deg, in_deg = defaultdict(int), defaultdict(int)
    for u, v in edges:
        out_deg[u] += 1
        in_deg[v] += 1
    if max(max(out_deg.values()), max(in_deg.values())) > P:
        return None
    at = {}  # (side, vertex, colour) -> edge
    colour = [-1] * len(edges)
    for n, (u, v) in enumerate(edges):
        left, right = ("L", u), ("R", v)
        a = next(c for c in range(P) if (*left, c) not in at)
        b = next(c for c in range(P) if (*right, c) not in at)
        if (*right, a) in at:  # flip the a/b alternating path from v, then a is free at both ends
            path, x, c = [], right, a
            while (*x, c) in at:
                m = at[(*x, c)]
                path.append(m)
                x = ("L", edges[m][0]) if x[0] == "R" else ("R", edges[m][1])
                c = b if c == a else a
            for m in path:
                del at[("L", edges[m][0], colour[m])]
                del at[("R", edges[m][1], colour[m])]
            for m in path:
                colour[m] = b if colour[m] == a else a
                at[("L", edges[m][0], colour[m])] = m
                at[("R", edges[m][1], colour[m])] = m
        colour[n] = a
        at[(*left, a)] = n
        at[(*right, a)] = n
    return colour
