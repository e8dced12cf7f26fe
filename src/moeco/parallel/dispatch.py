"""Expert-parallel dispatchers: the model's Dispatcher protocol over an EP group of P = N x G ranks.

Notation: T tokens on this rank, K experts per token (idx_TK, gate weights w_TK), E experts, L = E/P
per rank (rank p holds [p L, (p+1) L)), D hidden; node(p) = p // G, gpu(p) = p % G within the group.

Direct (`AllToAllDispatcher`), one copy per (token, expert), as a plain all-to-all:

    copies sorted by global expert (= by destination rank, then local expert), c_p rows to rank p
    counts (P, L) exchanged first (all_to_all_single), then the rows with splits c_p
    received: by source rank, then local expert -> stable sort by local expert -> x_CD
    combine: unsort, all-to-all back, y_t = sum_k w_tk y_tk  in the summation order below

Two-hop (`TwoHopDispatcher`), DeepEP's normal mode in spirit; a token crosses to each node once:

    hop 1 (inter_group): one item per (token, destination node n), to rank (n, my local index)
    hop 2 (intra_group): that rank forwards one item per (item, destination GPU) inside node n
    at the destination: one copy per (item, local expert), sorted by local expert
    combine, reversed: r_item2 = sum_{k on this GPU} w_k y_k -> hop 2 back, summed per item on the
    forwarder (the node's partial sum) -> hop 1 back -> y_t = sum over its nodes

Both leave the expert rank with the same x_CD, row for row: copies ordered by (local expert, source
rank, source token), the order LocalDispatcher gives on one rank; so the experts see identical input.

Summation order, one for both (`SumOrder`), so that their outputs and gradients agree bit for bit:
a token's K terms w_k y_k (combine), and its K copies' gradients (the dispatch's backward), are summed

    per destination rank, experts ascending -> per node, ranks ascending -> over nodes, ascending

each level in float32 and rounded to the payload dtype (what two-hop sends over a link) in between.
Two-hop sums so by construction (each rank, then the forwarder, then the source); direct has all K
terms at the source and runs the same three levels there (route.sum_rows: bit-equal where index_add
adds in index order, as on CPU; CUDA's atomics add in any order). Against LocalDispatcher (one sum
over the K slots) both agree to rounding.

With `fp8=True` the dispatch payload crosses as 1x128 E4M3 + scales (route.Fp8Rows) and the handle
carries (q, s) for experts that take them; combine stays in the experts' output dtype. Bytes sent go
to `counter` (route.TrafficCounter).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeco.model.moe import Routing, _GatherRows
from moeco.parallel.mesh import Mesh
from moeco.parallel.route import (AllToAll, AllToAllFn, Fp8Rows, Gather, MoveRows, PendingRows, TrafficCounter,
                                  exchange_counts, run_route, sum_rows)


@dataclass
class SumOrder:
    """A token's K terms summed per rank, per node, over nodes (see the module docstring), at the source.

    Rows: row t K + i is token t's i-th expert in ascending order (flat (token, slot) `slot_R`). A token
    reaches at most R1 = min(K, P) ranks and R2 = min(K, N) nodes. Level 1 sums rows into bucket
    t R1 + j, j the row's rank among t's distinct ranks; level 2 sums those into t R2 + m, m their node
    among t's distinct nodes; level 3 sums into t. Buckets a token leaves unused stay zero and add
    nothing (a + 0 = a). A level with one term per bucket (one expert per rank, one GPU per node, one
    node) is skipped: its sums would be the terms themselves.
    """

    slot_R: torch.Tensor  # (T K,) flat (token, slot) of each row
    rank_R: torch.Tensor  # (T K,) level-1 bucket of each row
    node_B: torch.Tensor  # (T R1,) level-2 bucket of each level-1 bucket
    T: int
    R1: int
    R2: int
    levels: tuple[bool, bool, bool]

    @classmethod
    def of(cls, indices_TK: torch.Tensor, experts_per_rank: int, gpus_per_node: int, nodes: int) -> SumOrder:
        T, K = indices_TK.shape
        R1, R2 = min(K, nodes * gpus_per_node), min(K, nodes)
        expert_TK, slot_TK = indices_TK.long().sort(dim=1)  # a token's experts are distinct
        rank_TK = expert_TK // experts_per_rank
        j_TK, m_TK = _run_ids(rank_TK), _run_ids(rank_TK // gpus_per_node)
        t_T1 = torch.arange(T, device=indices_TK.device)[:, None]
        m_TJ = indices_TK.new_zeros(T, R1, dtype=torch.long).scatter_(1, j_TK, m_TK)  # node of each rank bucket
        return cls((t_T1 * K + slot_TK).flatten(), (t_T1 * R1 + j_TK).flatten(), (t_T1 * R2 + m_TJ).flatten(),
                   T, R1, R2, (experts_per_rank > 1, gpus_per_node > 1, nodes > 1))

    def sum(self, z_RD: torch.Tensor) -> torch.Tensor:
        """(T, D): each token's rows summed level by level."""
        T = self.T
        if self.levels[0]:
            z_RD = sum_rows(z_RD, self.rank_R, T * self.R1)
        if self.levels[1]:
            z_RD = sum_rows(z_RD, self.node_B, T * self.R2)
        if self.levels[2]:
            return sum_rows(z_RD, torch.arange(T * self.R2, device=z_RD.device) // self.R2, T)
        return z_RD  # one node: (T, D) already


def _run_ids(v_TK: torch.Tensor) -> torch.Tensor:
    """Index of each entry's run of equal values along its row: [3, 3, 5, 7, 7] -> [0, 0, 1, 2, 2]."""
    new_TK = torch.ones_like(v_TK, dtype=torch.bool)
    new_TK[:, 1:] = v_TK[:, 1:] != v_TK[:, :-1]
    return new_TK.long().cumsum(1) - 1


@dataclass
class _CopiesOfTokens:
    """Route step: the copies to send, x[token_C] (copies by global expert); its reverse sums a token's
    copies in the SumOrder."""

    token_C: torch.Tensor
    sent_of_row: torch.Tensor  # sent copy holding SumOrder row r
    order: SumOrder

    def forward(self, x):
        return x.index_select(0, self.token_C)

    def backward(self, g):
        return self.order.sum(g.index_select(0, self.sent_of_row))


@dataclass
class DirectHandle:
    weights_TK: torch.Tensor
    sum_order: SumOrder
    sent_of_row: torch.Tensor  # sent copy holding SumOrder row r
    row_of_sent: torch.Tensor  # its inverse
    back: AllToAll  # the combine all-to-all (recv -> send)
    unsort: torch.Tensor  # received row i sits at x_CD[unsort[i]]
    sort: torch.Tensor
    x_fp8: tuple | None = None


def _direct_sum(y_sent: torch.Tensor, h: DirectHandle) -> torch.Tensor:
    """y_t = sum_k w_tk y_tk in the SumOrder, from the expert outputs as sent back (copies by global expert)."""
    y_RD = _GatherRows.apply(y_sent, h.sent_of_row, h.row_of_sent, 1)
    w_R = h.weights_TK.flatten().index_select(0, h.sum_order.slot_R)
    return h.sum_order.sum(y_RD * w_R.to(y_RD.dtype).unsqueeze(-1))


@dataclass
class TwoHopHandle:
    num_tokens: int
    weights_C: torch.Tensor  # gate weight of each copy of x_CD
    copy_item: torch.Tensor  # hop-2 item of each copy of x_CD
    n_item2: int
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

    # Issue/wait halves for a scheduler (moeco.parallel.overlap). The default runs the synchronous
    # method at issue time (nothing left in flight); AllToAllDispatcher overrides them with async ones.
    def dispatch_start(self, x_TD: torch.Tensor, routing: Routing, n_experts: int):
        return Done(self.dispatch(x_TD, routing, n_experts))

    def dispatch_wait(self, pending):
        return pending.wait()

    def combine_start(self, y_CD: torch.Tensor, handle):
        return Done(self.combine(y_CD, handle))

    def combine_wait(self, pending) -> torch.Tensor:
        return pending.wait()


@dataclass
class Done:
    """A 'pending' operation that completed when it was issued."""

    value: object

    def wait(self):
        return self.value


@dataclass
class _PendingDispatch:
    rows: PendingRows
    sort: torch.Tensor
    tokens_per_expert: torch.Tensor
    handle: DirectHandle

    def wait(self):
        return self.rows.wait().index_select(0, self.sort), self.tokens_per_expert, self.handle


@dataclass
class _PendingCombine:
    rows: PendingRows
    handle: DirectHandle

    def wait(self):
        return _direct_sum(self.rows.wait(), self.handle)


class AllToAllDispatcher(_EPBase):
    """One all-to-all each way over the EP group; see the module docstring."""

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, n_experts: int):
        return self._dispatch(x_TD, routing, n_experts, asynchronous=False)

    def dispatch_start(self, x_TD: torch.Tensor, routing: Routing, n_experts: int):
        """Counts exchanged (synchronously: the splits must be host integers), the payload issued."""
        if self.codec is not None:  # the FP8 payload keeps the synchronous path for now
            return Done(self.dispatch(x_TD, routing, n_experts))
        return self._dispatch(x_TD, routing, n_experts, asynchronous=True)

    def combine_start(self, y_CD: torch.Tensor, h: DirectHandle):
        y_recv = _GatherRows.apply(y_CD, h.unsort, h.sort, 1)
        return _PendingCombine(PendingRows(y_recv, h.back, self.counter, "combine"), h)

    def _dispatch(self, x_TD, routing, n_experts, asynchronous):
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
        spec = self.mesh.spec
        sum_order = SumOrder.of(routing.indices_TK, L, spec.ep_gpus_per_node, spec.ep_nodes)
        sent_of_row = inverse.index_select(0, sum_order.slot_R)
        row_of_sent = torch.empty_like(sent_of_row)
        row_of_sent[sent_of_row] = torch.arange(sent_of_row.numel(), device=flat.device)
        copies = _CopiesOfTokens(order // K, sent_of_row, sum_order)
        route = [copies, a2a, Gather(sort, sum(recv))]
        self.counter.tokens += T
        back = AllToAll(recv, send, self.mesh.ep_group, self.mesh.ep_ranks())
        handle = DirectHandle(routing.weights_TK, sum_order, sent_of_row, row_of_sent, back, unsort, sort)
        if asynchronous:
            rows = PendingRows(MoveRows.apply(x_TD, [copies], None, None)[0], a2a, self.counter, "dispatch")
            return _PendingDispatch(rows, sort, recv_PL.sum(0), handle)
        x_CD, q, sc = MoveRows.apply(x_TD, route, self.codec, self.counter)
        handle.x_fp8 = None if q is None else (q, sc)
        return x_CD, recv_PL.sum(0), handle

    def combine(self, y_CD: torch.Tensor, h: DirectHandle) -> torch.Tensor:
        y_recv = _GatherRows.apply(y_CD, h.unsort, h.sort, 1)
        return _direct_sum(AllToAllFn.apply(y_recv, h.back, self.counter, "combine"), h)


class TwoHopDispatcher(_EPBase):
    """Each token crosses to each destination node once and is forwarded inside it; see the docstring."""

    def dispatch(self, x_TD: torch.Tensor, routing: Routing, n_experts: int):
        return self._dispatch(x_TD, routing, n_experts, asynchronous=False)

    def dispatch_start(self, x_TD: torch.Tensor, routing: Routing, n_experts: int):
        """Metadata hops run now (they size the item lists); the payload's inter-node hop is posted, its
        intra-node hop runs in `dispatch_wait`."""
        if self.codec is not None:
            return Done(self.dispatch(x_TD, routing, n_experts))
        return self._dispatch(x_TD, routing, n_experts, asynchronous=True)

    def combine_start(self, y_CD: torch.Tensor, h: TwoHopHandle):
        """The intra-node hop back and the node's partial sum run now; the inter-node hop is posted."""
        part_1D = self._combine_intra(y_CD, h)
        return _PendingTwoHopCombine(PendingRows(part_1D, _reverse(h.hop1), self.counter, "combine"), h)

    def _dispatch(self, x_TD, routing, n_experts, asynchronous):
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
        route = [Gather(token1, T), hop1, Gather(item1, M1), hop2, Gather(copy_item, M2)]
        self.counter.tokens += T
        if asynchronous:
            rows = PendingRows(MoveRows.apply(x_TD, route[:1], None, None)[0], hop1, self.counter, "dispatch")
            x_CD, q = None, None
        else:
            x_CD, q, sc = MoveRows.apply(x_TD, route, self.codec, self.counter)
        w_JK = MoveRows.apply(routing.weights_TK, route[:4], None, self.counter, "meta")[0]
        w_C = w_JK[copy_item, slot[sort]]
        tokens_per_expert = torch.zeros(L, dtype=torch.int64, device=dev).scatter_add_(0, e_C, torch.ones_like(e_C))
        handle = TwoHopHandle(T, w_C, copy_item, M2, hop2, hop1, item1, M1, token1,
                              None if q is None else (q, sc))
        if asynchronous:
            return _PendingTwoHop(rows, route[2:], handle, tokens_per_expert, self.counter)
        return x_CD, tokens_per_expert, handle

    def combine(self, y_CD: torch.Tensor, h: TwoHopHandle) -> torch.Tensor:
        back1 = AllToAllFn.apply(self._combine_intra(y_CD, h), _reverse(h.hop1), self.counter, "combine")
        return sum_rows(back1, h.token_of_item1, h.num_tokens)  # over nodes

    def _combine_intra(self, y_CD: torch.Tensor, h: TwoHopHandle) -> torch.Tensor:
        """The rank's partial sum per hop-2 item (experts ascending), then the node's (GPUs ascending)."""
        r_JD = sum_rows(y_CD * h.weights_C.to(y_CD.dtype).unsqueeze(-1), h.copy_item, h.n_item2)
        back2 = AllToAllFn.apply(r_JD, _reverse(h.hop2), self.counter, "combine")
        return sum_rows(back2, h.item1_of_item2, h.n_item1)


@dataclass
class _PendingTwoHop:
    rows: PendingRows  # hop 1 (between nodes), in flight
    rest: list  # the route after hop 1: Gather(item1), hop 2, Gather(copy_item)
    handle: TwoHopHandle
    tokens_per_expert: torch.Tensor
    counter: TrafficCounter

    def wait(self):
        x_CD = MoveRows.apply(self.rows.wait(), self.rest, None, self.counter)[0]
        return x_CD, self.tokens_per_expert, self.handle


@dataclass
class _PendingTwoHopCombine:
    rows: PendingRows  # hop 1 back, in flight
    handle: TwoHopHandle

    def wait(self):
        return sum_rows(self.rows.wait(), self.handle.token_of_item1, self.handle.num_tokens)


def _reverse(step: AllToAll) -> AllToAll:
    return AllToAll(step.recv, step.send, step.group, step.peers)


DISPATCHERS = {"direct": AllToAllDispatcher, "two_hop": TwoHopDispatcher}
