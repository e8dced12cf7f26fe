"""Expert-parallel dispatchers: the model's Dispatcher protocol over an EP group of P = N x G ranks.

Notation: T tokens on this rank, K experts per token (idx_TK, gate weights w_TK), E experts, L = E/P
per rank (rank p holds [p L, (p+1) L)), D hidden; node(p) = p // G, gpu(p) = p % G within the group.

Direct (`AllToAllDispatcher`), one copy per (token, expert), as a plain all-to-all:

    copies sorted by global expert (= by destination rank, then local expert), c_p rows to rank p
    counts (P, L) exchanged first (all_to_all_single), then the rows with splits c_p
    received: by source rank, then local expert -> stable sort by local expert -> x_CD
    combine: unsort, all-to-all back, y_t = sum_k w_tk y_tk  (moe.weighted_combine, as LocalDispatcher)

Two-hop (`TwoHopDispatcher`), DeepEP's normal mode in spirit; a token crosses to each node once:

    hop 1 (inter_group): one item per (token, destination node n), to rank (n, my local index)
    hop 2 (intra_group): that rank forwards one item per (item, destination GPU) inside node n
    at the destination: one copy per (item, local expert), sorted by local expert
    combine, reversed: r_item2 = sum_{k on this GPU} w_k y_k -> hop 2 back, summed per item on the
    forwarder (the node's partial sum) -> hop 1 back -> y_t = sum over its nodes

Both leave the expert rank with the same x_CD, row for row: copies ordered by (local expert, source
rank, source token), the order LocalDispatcher gives on one rank; so the experts see identical input.
The two combines sum the K terms in a different order (node partials first), so their outputs agree
to rounding, not bit for bit. With `fp8=True` the dispatch payload crosses as 1x128 E4M3 + scales
(route.Fp8Rows) and the handle carries (q, s) for experts that take them; combine stays in the
experts' output dtype. Bytes sent go to `counter` (route.TrafficCounter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeco.model.moe import Routing, _GatherRows, weighted_combine
from moeco.parallel.mesh import Mesh
from moeco.parallel.route import (AllToAll, AllToAllFn, Fp8Rows, Gather, MoveRows, TrafficCounter,
                                  exchange_counts, run_route)


@dataclass
class DirectHandle:
    order: torch.Tensor
    inverse: torch.Tensor
    weights_TK: torch.Tensor
    num_tokens: int
    back: AllToAll  # the combine all-to-all (recv -> send)
    unsort: torch.Tensor  # received row i sits at x_CD[unsort[i]]
    sort: torch.Tensor
    x_fp8: tuple | None = None


@dataclass
class TwoHopHandle:
    num_tokens: int
    weights_JK: torch.Tensor  # gate weights of each hop-2 item, zero where the expert is not here
    copy_of_JK: torch.Tensor  # row of x_CD holding (item, slot), or C (a zero row) where not here
    hop2: AllToAll
    hop1: AllToAll
    item1_of_item2: torch.Tensor  # on the forwarder
    n_item1: int
    token_of_item1: torch.Tensor  # on the source
    x_fp8: tuple | None = None


class _EPBase:
    def __init__(self, mesh: Mesh, fp8: bool = False, counter: TrafficCounter | None = None,
                 pow2_scale: bool = False):
        s = mesh.spec
        self.mesh, self.P, self.me = mesh, s.ep, s.ep_rank
        self.codec = Fp8Rows(pow2_scale) if fp8 else None
        self.counter = counter if counter is not None else TrafficCounter(s.gpus_per_node, s.rank)

    def _local_experts(self, n_experts: int) -> int:
        return n_experts // self.P


class AllToAllDispatcher(_EPBase):
    """One all-to-all each way over the EP group; see the module docstring."""

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, n_experts: int):
        P, L = self.P, self._local_experts(n_experts)
        T, K = routing.indices_TK.shape
        flat = routing.indices_TK.flatten()
        order = flat.argsort(stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        counts_PL = torch.zeros(n_experts, dtype=torch.int64, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat)).view(P, L)
        recv_PL = exchange_counts(counts_PL.flatten(), self.mesh.ep_group).view(P, L)
        both = torch.stack([counts_PL.sum(1), recv_PL.sum(1)]).tolist()  # the one host read
        send, recv = both
        local_e = torch.arange(L, device=flat.device).repeat(P).repeat_interleave(recv_PL.flatten(),
                                                                                   output_size=sum(recv))
        sort = local_e.argsort(stable=True)
        unsort = torch.empty_like(sort)
        unsort[sort] = torch.arange(sort.numel(), device=sort.device)
        a2a = AllToAll(send, recv, self.mesh.ep_group, self.mesh.ep_ranks())
        route = [Gather(order // K, T), a2a, Gather(sort, sum(recv))]
        self.counter.tokens += T
        x_CD, q, s = MoveRows.apply(x_TD, route, self.codec, self.counter)
        back = AllToAll(recv, send, self.mesh.ep_group, self.mesh.ep_ranks())
        handle = DirectHandle(order, inverse, routing.weights_TK, T, back, unsort, sort,
                              None if q is None else (q, s))
        return x_CD, recv_PL.sum(0), handle

    def combine(self, y_CD: torch.Tensor, h: DirectHandle) -> torch.Tensor:
        y_recv = _GatherRows.apply(y_CD, h.unsort, h.sort, 1)
        y_sent = AllToAllFn.apply(y_recv, h.back, self.counter, "combine")
        return weighted_combine(y_sent, h.weights_TK, h.order, h.inverse)


class TwoHopDispatcher(_EPBase):
    """Each token crosses to each destination node once and is forwarded inside it; see the docstring."""

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, n_experts: int):
        m, s = self.mesh, self.mesh.spec
        G, N, L = s.ep_gpus_per_node, s.ep_nodes, self._local_experts(n_experts)
        my_node, dev = self.me // G, x_TD.device
        idx_TK = routing.indices_TK
        T, K = idx_TK.shape
        # hop 1: one item per (token, destination node), ordered by (node, token)
        node_TK = idx_TK // (L * G)
        reach_NT = torch.zeros(N, T, dtype=torch.bool, device=dev)
        reach_NT.scatter_(0, node_TK.t(), True)
        _, token1 = reach_NT.nonzero(as_tuple=True)
        send1 = reach_NT.sum(1)
        recv1 = exchange_counts(send1, m.inter_group)
        meta_TM = torch.cat([torch.full((T, 1), self.me, dtype=torch.int64, device=dev),
                             torch.arange(T, device=dev)[:, None], idx_TK.long()], dim=1)  # src, token, ids
        s1, r1 = torch.stack([send1, recv1]).tolist()
        hop1 = AllToAll(s1, r1, m.inter_group, m.inter_ranks())
        M1 = sum(r1)
        meta1 = run_route([Gather(token1, T), hop1], meta_TM, self.counter)
        # hop 2 on the forwarder: one item per (item, destination GPU of this node), ordered by (GPU, item)
        rank_1K = meta1[:, 2:] // L
        gpu_1K = torch.where(rank_1K // G == my_node, rank_1K % G, G)  # G: another node's expert
        reach_G1 = torch.zeros(G + 1, M1, dtype=torch.bool, device=dev)
        reach_G1.scatter_(0, gpu_1K.t(), True)
        _, item1 = reach_G1[:G].nonzero(as_tuple=True)
        send2 = reach_G1[:G].sum(1)
        recv2 = exchange_counts(send2, m.intra_group)
        s2, r2 = torch.stack([send2, recv2]).tolist()
        hop2 = AllToAll(s2, r2, m.intra_group, m.intra_ranks())
        M2 = sum(r2)
        meta2 = run_route([Gather(item1, M1), hop2], meta1, self.counter)
        # at the destination: one copy per (item, local expert), by (local expert, source rank, token)
        local_JK = meta2[:, 2:] - self.me * L
        here_JK = (local_JK >= 0) & (local_JK < L)
        item2, slot = here_JK.nonzero(as_tuple=True)
        e_C = local_JK[item2, slot]
        key = (e_C * self.P + meta2[item2, 0]) * (1 << 40) + meta2[item2, 1]
        sort = key.argsort()
        copy_item = item2[sort]
        C = copy_item.numel()
        copy_of_JK = torch.full((M2, K), C, dtype=torch.int64, device=dev)
        copy_of_JK[item2[sort], slot[sort]] = torch.arange(C, device=dev)
        route = [Gather(token1, T), hop1, Gather(item1, M1), hop2, Gather(copy_item, M2)]
        self.counter.tokens += T
        x_CD, q, sc = MoveRows.apply(x_TD, route, self.codec, self.counter)
        w_JK = MoveRows.apply(routing.weights_TK, route[:4], None, self.counter, "meta")[0]
        w_JK = torch.where(here_JK, w_JK, torch.zeros((), dtype=w_JK.dtype, device=dev))
        tokens_per_expert = torch.zeros(L, dtype=torch.int64, device=dev).scatter_add_(0, e_C, torch.ones_like(e_C))
        handle = TwoHopHandle(T, w_JK, copy_of_JK, hop2, hop1, item1, M1, token1,
                              None if q is None else (q, sc))
        return x_CD, tokens_per_expert, handle

    def combine(self, y_CD: torch.Tensor, h: TwoHopHandle) -> torch.Tensor:
        D = y_CD.shape[-1]
        y_pad = torch.cat([y_CD, y_CD.new_zeros(1, D)])  # row C: the zero row for slots not here
        M2, K = h.copy_of_JK.shape
        y_JKD = y_pad.index_select(0, h.copy_of_JK.flatten()).view(M2, K, D)
        r_JD = (y_JKD * h.weights_JK.to(y_CD.dtype).unsqueeze(-1)).sum(dim=1)
        back2 = AllToAllFn.apply(r_JD, _reverse(h.hop2), self.counter, "combine")
        part_1D = back2.new_zeros(h.n_item1, D).index_add(0, h.item1_of_item2, back2)  # the node's partial sum
        back1 = AllToAllFn.apply(part_1D, _reverse(h.hop1), self.counter, "combine")
        return back1.new_zeros(h.num_tokens, D).index_add(0, h.token_of_item1, back1)


def _reverse(step: AllToAll) -> AllToAll:
    return AllToAll(step.recv, step.send, step.group, step.peers)


DISPATCHERS = {"direct": AllToAllDispatcher, "two_hop": TwoHopDispatcher}
