"""Dual micro-batch overlap: one micro-batch's all-to-all in flight while the other computes, forward and backward.

The batch (B sequences) is split in two micro-batches A and B (B_A = ceil(B/2)). Each runs the decoder
layers as a generator that *yields* right after issuing a communication (`dispatch_start`,
`combine_start`, asynchronous) and, when resumed, first waits for it. The scheduler resumes A and B in
turn, so per MoE layer (time runs to the right; `|` a yield):

    A: attn route issue(dA) shared |                 wait(dA) experts issue(cA) |                 wait(cA) add attn'
    B:                             | attn route issue(dB) shared |              wait(dB) experts issue(cB) |
    wire:        [== dA ==========================]    [== dB ===============]  [== cA ==========]  [== cB

A's dispatch dA is issued before B's attention and waited on after it (and after B's shared experts);
B's dispatch hides under A's experts, A's combine under B's experts, B's combine under A's next
attention. This is DeepSeek-V3's two-micro-batch overlap (section 13 of the facts file: attention and
MoE of one micro-batch against dispatch/combine of the other).

Backward. Autograd's engine runs, of the nodes ready, the one made last (one ready queue per device,
ordered by sequence number); a node's consumers were all made after it, so it is ready at its turn and
the backward runs the forward's nodes in exactly the reverse order of their making. An asynchronous
all-to-all is two nodes (route.PendingRows): `_Posted`, made at issue, and `_Landed`, made at wait,
joined by an empty tensor. In the backward `_Landed` runs first and posts the reverse all-to-all of the
gradient (split sizes known from the forward: no count exchange), the nodes made in between (the other
micro-batch's stages) run, and `_Posted` waits. So per MoE layer, every stage a backward and every
post/wait the gradient's all-to-all (B leads: it was made last):

    B: attn' add post(cB) |                    | wait(cB) experts post(dB) |                           |
    A:                    | attn' add post(cA) |                           | wait(cA) experts post(dA) |

then B: shared wait(dB) route attn, A: shared wait(dA) route attn, each with the layer below's add and
post(c). B's combine gradient hides under A's backward of the next attention, A's under B's experts,
B's dispatch gradient under A's experts, A's under B's shared experts, router and attention: the
forward's pairing, mirrored. Every rank makes the same nodes in the same order, so the ranks post their
collectives in the same order. The order is the engine's, not a documented contract; the event-order
test (tests/test_parallel_overlap.py) holds it. `overlap_backward=False` sends and receives each
gradient at `_Landed` (forward overlap only): the reference. DualPipe's pairing of one micro-batch's
forward with another's backward across pipeline stages is not built (no pipeline parallelism).

Numerics: every token meets the same weights, routing and experts as in the plain forward; only the
batch is cut in two (matmul shapes change, so fp32 results agree to rounding, not bit for bit, with the
whole-batch forward; bit for bit, forward and gradients, with the same two micro-batches run one after
the other). The sequence balance term is averaged over sequences, so the halves' terms are weighted by
their sizes.

Measurement (`Timeline`, `OverlapStats` per pass): host wall clock on CPU, CUDA events on GPU, per span:
compute (attention, router, shared experts, experts, residual add; in the backward also the comm's local
gathers and sums), comm_issue (forward: count exchange, which blocks because the splits must be host
integers, plus posting the payload; backward: posting), comm_wait (blocked in `wait`), and in_flight:
the time between the issue returning and the wait starting, during which the other micro-batch computed;
that is an upper bound on the communication hidden (the transfer may have ended sooner). Backward spans
are recorded as the engine runs: a hook on each stage's output (its gradient ready: the stage's backward
starts) and the gradient all-to-all's post and wait.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch

from moeco.model.moe import MoE, sequence_balance_loss

MODES = ("none", "two_microbatch")


@dataclass
class OverlapStats:
    """Seconds in one pass, forward or backward (summed over layers and micro-batches)."""

    compute_s: float = 0.0
    comm_issue_s: float = 0.0
    comm_wait_s: float = 0.0
    in_flight_s: float = 0.0  # comm in flight while the host computed (upper bound on overlapped time)
    wall_s: float = 0.0

    @property
    def comm_blocked_s(self) -> float:
        return self.comm_issue_s + self.comm_wait_s

    def __add__(self, other: "OverlapStats") -> "OverlapStats":
        return OverlapStats(*(getattr(self, k) + getattr(other, k) for k in STAT_FIELDS))


STAT_FIELDS = ("compute_s", "comm_issue_s", "comm_wait_s", "in_flight_s", "wall_s")
PHASES = ("forward", "backward")


class Timeline:
    """Spans (micro-batch, layer, kind, name, t0, t1) of one scheduled forward and of its backward.

    kind: "compute", "issue" or "wait". Forward spans are timed around each stage. Backward spans are
    recorded by the autograd engine as it runs: `backward_mark` (a hook on a stage's output, so when
    its gradient is ready) opens the compute span of that stage's backward, closed by the next event;
    `backward_span` times the issue and the wait of a gradient's all-to-all (route.GradLink), after
    which the comm's local work (gathers, weighted sums) counts as compute under the comm's name.
    On CUDA the times are events, resolved by `spans()` (one sync)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        self.raw = {"forward": [], "backward": []}
        self._open = None  # the backward compute span running now: (mb, layer, name, t0)
        self.t0 = self._now()

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    @contextmanager
    def span(self, mb: int, layer: int, kind: str, name: str):
        t0 = self._now()
        yield
        self.raw["forward"].append((mb, layer, kind, name, t0, self._now()))

    @contextmanager
    def backward_span(self, mb: int, layer: int, kind: str, name: str):
        t0 = self._now()
        self._close(t0)
        yield
        t1 = self._now()
        self.raw["backward"].append((mb, layer, kind, name, t0, t1))
        self._open = (mb, layer, name, t1)

    def backward_mark(self, mb: int, layer: int, name: str | None) -> None:
        """The backward of stage `name` starts now (None: the micro-batch's backward ended)."""
        t = self._now()
        self._close(t)
        self._open = None if name is None else (mb, layer, name, t)

    def _close(self, t) -> None:
        if self._open is not None:
            mb, layer, name, t0 = self._open
            self.raw["backward"].append((mb, layer, "compute", name, t0, t))
            self._open = None

    def _sec(self, t) -> float:
        return self.t0.elapsed_time(t) / 1e3 if self.cuda else t - self.t0

    def spans(self, phase: str = "forward") -> list[tuple]:
        if self.cuda:
            torch.cuda.synchronize()
        return [(mb, l, k, n, self._sec(a), self._sec(b)) for mb, l, k, n, a, b in self.raw[phase]]

    def order(self, phase: str = "forward") -> list[str]:
        """'A:issue:dispatch:0'-style labels in the order the spans started."""
        return [f"{'AB'[mb]}:{k}:{n}:{l}" for mb, l, k, n, *_ in self.raw[phase]]

    def stats(self, phase: str = "forward") -> OverlapStats:
        sp = self.spans(phase)
        st = OverlapStats()
        issued = {}
        for mb, layer, kind, name, a, b in sp:
            if kind == "compute":
                st.compute_s += b - a
            elif kind == "issue":
                st.comm_issue_s += b - a
                issued[(mb, layer, name)] = b
            else:
                st.comm_wait_s += b - a
                if (mb, layer, name) in issued:
                    st.in_flight_s += a - issued.pop((mb, layer, name))
        if sp:
            st.wall_s = max(s[5] for s in sp) - min(s[4] for s in sp)
        return st


def _start(d, op, *args):
    fn = getattr(d, f"{op}_start", None)
    if fn is not None:
        return fn(*args)
    from moeco.parallel.dispatch import Done  # a dispatcher without halves (LocalDispatcher): run it now

    return Done(getattr(d, op)(*args))


def _link(pending, tl: Timeline, mb: int, layer: int, name: str, overlap_backward: bool) -> None:
    """Label the backward of the all-to-all in flight (route.PendingRows, a pending's `rows`), if any."""
    rows = getattr(pending, "rows", None)
    if rows is not None:
        rows.link.asynchronous = overlap_backward
        rows.link.span = lambda kind: tl.backward_span(mb, layer, kind, name)


def _mark(x: torch.Tensor, tl: Timeline, mb: int, layer: int, name: str | None) -> torch.Tensor:
    """Record the start of the backward of the stage that made x (when x's gradient is ready)."""
    if x.requires_grad and torch.is_grad_enabled():
        x.register_hook(lambda g: tl.backward_mark(mb, layer, name))
    return x


def _microbatch(layers, x, inp, return_aux: bool, tl: Timeline, mb: int, overlap_backward: bool = True):
    """Generator: one micro-batch through the decoder layers, yielding after each issued communication."""
    balance = []
    _mark(x, tl, mb, -1, None)  # its gradient is ready when the backward of both micro-batches is done
    for i, layer in enumerate(layers):
        with tl.span(mb, i, "compute", "attention"):
            x = _mark(layer.attention(x, inp), tl, mb, i, "attention")
        moe = layer.mlp
        if not isinstance(moe, MoE):
            with tl.span(mb, i, "compute", "mlp"):
                x = _mark(layer.ffn(x), tl, mb, i, "mlp")
            continue
        B, S, D = x.shape
        with tl.span(mb, i, "compute", "route"):
            h_TD = layer.post_attention_layernorm(x).reshape(B * S, D)
            routing = moe.route(h_TD)
            _mark(routing.weights_TK, tl, mb, i, "route")
        with tl.span(mb, i, "issue", "dispatch"):
            pending = _start(moe.dispatcher, "dispatch", h_TD, routing, moe.n_experts)
            _link(pending, tl, mb, i, "dispatch", overlap_backward)
        with tl.span(mb, i, "compute", "shared"):  # under this micro-batch's own dispatch
            shared = moe.shared_experts(h_TD) if moe.shared_experts is not None else None
            if shared is not None:
                _mark(shared, tl, mb, i, "shared")
        yield
        with tl.span(mb, i, "wait", "dispatch"):
            x_CD, tpe, handle = pending.wait()
        with tl.span(mb, i, "compute", "experts"):
            y_CD = _mark(moe.run_experts(x_CD, tpe, getattr(handle, "x_fp8", None)), tl, mb, i, "experts")
        with tl.span(mb, i, "issue", "combine"):
            pending = _start(moe.dispatcher, "combine", y_CD, handle)
            _link(pending, tl, mb, i, "combine", overlap_backward)
        yield
        with tl.span(mb, i, "wait", "combine"):
            y_TD = pending.wait()
        with tl.span(mb, i, "compute", "add"):
            out = y_TD + shared if shared is not None else y_TD
            x = _mark(x + out.view(B, S, D), tl, mb, i, "add")
        if return_aux:
            balance.append(sequence_balance_loss(routing, B, moe.n_experts) * B)
    return x, balance


def split_inputs(inp, lo: int, hi: int):
    """The attention inputs of batch rows lo..hi-1: per-row rotary tables, positions and cache rows
    sliced (a paged cache gives a view with those rows' slots and block tables, `rows(lo, hi)`)."""
    def rows(t):
        return t[lo:hi] if t is not None and t.dim() == 3 else t  # (S, R/2) tables are shared by every row

    return replace(inp, cos=rows(inp.cos), sin=rows(inp.sin),
                   positions=None if inp.positions is None else inp.positions[lo:hi],
                   cache=None if inp.cache is None else inp.cache.rows(lo, hi))


def run_two_microbatch(layers, x, inp, return_aux: bool = False, timeline: Timeline | None = None,
                       interleave: bool = True, overlap_backward: bool = True, micro_batches: int = 2):
    """x (B, S, D) through `layers`, two micro-batches; returns (x, per-layer balance terms or []).

    A has ceil(B/2) rows, B the rest (possibly none: its MoE layers still dispatch and combine, with 0
    rows). interleave=False runs A to the end, then B: the same arithmetic without the overlap (the
    reference for bit-for-bit comparisons). overlap_backward=False sends and receives each gradient's
    all-to-all at once (the backward of the forward's wait), so only the forward overlaps.
    micro_batches=1 runs the whole batch through the same timed stages, each all-to-all waited on as
    soon as it is issued (only a dispatch has its own shared experts under it): the plain schedule,
    measured."""
    if micro_batches not in (1, 2):
        raise ValueError(f"micro_batches = {micro_batches}: the schedule runs 1 or 2")
    tl = timeline if timeline is not None else Timeline(x.device)
    Bt = x.shape[0]
    bounds = [0, Bt] if micro_batches == 1 else [0, (Bt + 1) // 2, Bt]
    parts = [(x[lo:hi], split_inputs(inp, lo, hi)) for lo, hi in zip(bounds, bounds[1:])]
    gens = [_microbatch(layers, p, p_inp, return_aux, tl, mb, overlap_backward)
            for mb, (p, p_inp) in enumerate(parts)]
    results = [None] * len(parts)
    if interleave:
        live = list(range(len(parts)))
        while live:
            for mb in list(live):
                try:
                    next(gens[mb])
                except StopIteration as stop:
                    results[mb] = stop.value
                    live.remove(mb)
    else:
        for mb in range(len(parts)):
            while True:
                try:
                    next(gens[mb])
                except StopIteration as stop:
                    results[mb] = stop.value
                    break
    h = torch.cat([r[0] for r in results], dim=0)
    balance = [sum(terms) / Bt for terms in zip(*(r[1] for r in results))]
    return h, balance


@dataclass
class TwoMicrobatch:
    """A forward schedule for `Transformer.schedule`: the decoder layers over two micro-batches; their
    backward, run by autograd, follows the same pairing mirrored.

    Falls back to the plain forward with fewer than `min_sequences` sequences, or with a cache that
    cannot be cut by rows (the dense cache of moeco.generate; the serving engine's paged cache can).
    Expert-parallel serving sets min_sequences = 0: every rank then splits every forward, even of
    one sequence or none, so all ranks issue the same collectives. `last` is the timeline of the
    latest scheduled forward, `history` the latest `keep` ones; their backward spans fill in as the
    backward runs, so read `stats()` after it."""

    interleave: bool = True
    overlap_backward: bool = True
    last: Timeline | None = None
    history: list = field(default_factory=list)
    keep: int = 0  # how many timelines to keep in history (0: none)
    min_sequences: int = 2
    micro_batches: int = 2  # 1: the whole batch, timed, each all-to-all waited on when issued (a baseline)

    def applies(self, input_ids: torch.Tensor, inp) -> bool:
        return input_ids.shape[0] >= self.min_sequences and (inp.cache is None or hasattr(inp.cache, "rows"))

    def __call__(self, model, emb: torch.Tensor, inp, return_aux: bool):
        self.last = Timeline(emb.device)
        h, balance = run_two_microbatch(model.model.layers, emb, inp, return_aux, self.last, self.interleave,
                                        self.overlap_backward, self.micro_batches)
        if self.keep:
            self.history = (self.history + [self.last])[-self.keep:]
        return h, balance

    def stats(self, phase: str = "forward") -> OverlapStats:
        """`phase` summed over the timelines in history."""
        return sum((t.stats(phase) for t in self.history), OverlapStats())


def set_overlap(model, mode: str) -> TwoMicrobatch | None:
    """parallel.overlap: 'none' (the plain forward) or 'two_microbatch'; returns the schedule set."""
    from moeco.errors import ConfigError

    if mode not in MODES:
        raise ConfigError(f"parallel.overlap = {mode!r}; choose none or two_microbatch")
    model.schedule = TwoMicrobatch() if mode == "two_microbatch" else None
    return model.schedule
