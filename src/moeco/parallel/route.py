"""Rows moved between ranks: a route of gathers and all-to-alls, run forward or in reverse.

A dispatcher moves token rows along a *route*, a list of steps, each of which maps a (M_in, ...) row
tensor to (M_out, ...):

    Gather(index, n_in)                 out = x[index]                  reverse: sum_rows(g, index, n_in)
    AllToAll(send, recv, group, peers)  rows [sum send[:p], ...) go to  reverse: the same with send and recv
                                        group rank p; recv[p] arrive    swapped
                                        from p, in peer order

Forward (dispatch): the payload moves as bytes if a codec encodes it (FP8: 1x128 E4M3 + float32
scales, one uint8 row per token, since gloo cannot send FP8), and is decoded once at the end, so a
forwarding rank never re-quantizes. Backward (the combine direction): the gradient runs the route
in reverse in the activations' precision; a Gather's reverse sums the copies of a row, so the
gradient of a token is the sum over everywhere it went. `AllToAllFn` is the differentiable
all-to-all that the combine path is built from (its backward is the reverse all-to-all).

`sum_rows(x, index, n)` is the one way rows are summed: out[i] = the rows r with index[r] = i, added
in row order (a row order the dispatchers choose so that both sum a token's terms alike), in float32
and rounded once to x's dtype. The row order holds where index_add adds in index order, as on CPU;
CUDA's atomics add in any order.

Split sizes must be host integers (all_to_all_single takes lists): exchanging counts costs one
device-to-host read per hop. Every all-to-all adds its bytes to a `TrafficCounter`, split into
intra-node, inter-node and self (a rank's rows to itself cross no link).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moeco.errors import MoecoError


class PeerLost(MoecoError):
    """A collective of the expert-parallel exchange failed: a peer rank died, hung or disagreed."""


def _collective(fn, what: str, group):
    try:
        return fn()
    except (RuntimeError, dist.DistError) as exc:  # gloo: connection closed / timed out; NCCL: watchdog
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise PeerLost(f"rank {dist.get_rank()}: the expert-parallel {what} failed, so a peer rank died or stopped "
                       f"answering within parallel.timeout_s (see that rank's error); stopping ({first})") from None


@dataclass
class TrafficCounter:
    """Bytes this rank sent in the forward pass, by kind ("dispatch", "combine", "meta") and link."""

    gpus_per_node: int = 1
    rank: int = 0
    bytes: dict = field(default_factory=dict)  # (kind, "intra" | "inter" | "self") -> int
    tokens: int = 0  # tokens routed by this rank (per MoE layer call)
    rows: dict = field(default_factory=dict)  # (kind, link) -> rows
    enabled: bool = True

    def add(self, kind: str, peers: list[int], rows: list[int], row_bytes: int) -> None:
        if not self.enabled:
            return
        me = self.rank // self.gpus_per_node
        for peer, n in zip(peers, rows):
            link = "self" if peer == self.rank else ("intra" if peer // self.gpus_per_node == me else "inter")
            key = (kind, link)
            self.bytes[key] = self.bytes.get(key, 0) + n * row_bytes
            self.rows[key] = self.rows.get(key, 0) + n

    def get(self, kind: str, link: str) -> int:
        return self.bytes.get((kind, link), 0)

    def reset(self) -> None:
        self.bytes, self.rows, self.tokens = {}, {}, 0

    def as_vector(self) -> torch.Tensor:
        """(10,) float64: dispatch, combine, meta bytes (intra, inter), self bytes, tokens, dispatch rows
        (intra, inter); for all_reduce."""
        keys = [(k, l) for k in ("dispatch", "combine", "meta") for l in ("intra", "inter")]
        selfb = sum(v for (k, l), v in self.bytes.items() if l == "self")
        rows = [self.rows.get(("dispatch", l), 0) for l in ("intra", "inter")]
        return torch.tensor([self.get(*k) for k in keys] + [selfb, self.tokens] + rows, dtype=torch.float64)

    @staticmethod
    def summary(vec: torch.Tensor) -> dict:
        """Per-step totals (summed over ranks) and bytes per routed token, from `as_vector` sums."""
        v = vec.tolist()
        out = {"ep_dispatch_intra_bytes": v[0], "ep_dispatch_inter_bytes": v[1], "ep_combine_intra_bytes": v[2],
               "ep_combine_inter_bytes": v[3], "ep_meta_intra_bytes": v[4], "ep_meta_inter_bytes": v[5],
               "ep_tokens": v[7]}
        if v[7]:
            out["ep_inter_bytes_per_token"] = (v[1] + v[3]) / v[7]
            out["ep_intra_bytes_per_token"] = (v[0] + v[2]) / v[7]
            out["ep_inter_rows_per_token"] = v[9] / v[7]
            out["ep_intra_rows_per_token"] = v[8] / v[7]
        return out


def _row_bytes(x: torch.Tensor) -> int:
    return x.shape[1:].numel() * x.element_size()


def all_to_all_rows(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """Rows of x split by `send` to the group's ranks; `recv[p]` rows arrive from rank p."""
    out = x.new_empty((sum(recv), *x.shape[1:]))
    if x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError("send FP8 rows as uint8 (gloo has no FP8); see Fp8Rows")
    _collective(lambda: dist.all_to_all_single(out, x.contiguous(), recv, send, group=group), "all-to-all", group)
    return out


def sum_rows(x_RD: torch.Tensor, index_R: torch.Tensor, n: int) -> torch.Tensor:
    """(n, D): out[i] = sum of the rows r with index_R[r] = i, in row order, accumulated in float32."""
    out = torch.zeros((n, *x_RD.shape[1:]), dtype=torch.float32, device=x_RD.device)
    return out.index_add(0, index_R, x_RD.float()).to(x_RD.dtype)


@dataclass
class Gather:
    index: torch.Tensor
    n_in: int

    def forward(self, x):
        return x.index_select(0, self.index)

    def backward(self, g):
        return sum_rows(g, self.index, self.n_in)


@dataclass
class AllToAll:
    send: list[int]
    recv: list[int]
    group: object
    peers: list[int]  # global rank of each group member

    def forward(self, x, counter: TrafficCounter | None = None, kind: str = "dispatch"):
        if counter is not None:
            counter.add(kind, self.peers, self.send, _row_bytes(x))
        return all_to_all_rows(x, self.send, self.recv, self.group)

    def backward(self, g):
        return all_to_all_rows(g, self.recv, self.send, self.group)


def run_route(route: list, x: torch.Tensor, counter=None, kind: str = "meta") -> torch.Tensor:
    """Move x along the route without autograd (metadata: token ids, expert ids)."""
    for step in route:
        x = step.forward(x, counter, kind) if isinstance(step, AllToAll) else step.forward(x)
    return x


class Fp8Rows:
    """Codec: a row of D values -> D bytes of E4M3 + ceil(D/128) float32 scales as bytes (1x128 tiles).

    pow2_scale: power-of-two scales ("ue8m0"), as the recipe's activations use, so that experts can
    take the payload as their own quantization of the input."""

    def __init__(self, pow2_scale: bool = False):
        self.pow2_scale = pow2_scale

    def encode(self, x_TD: torch.Tensor) -> torch.Tensor:
        from moeco.fp8.quantize import quantize_act_1x128

        q, s = quantize_act_1x128(x_TD, pow2_scale=self.pow2_scale)
        return torch.cat([q.view(torch.uint8), s.float().contiguous().view(torch.uint8)], dim=1)

    @staticmethod
    def decode(b_CB: torch.Tensor, dim: int, dtype: torch.dtype):
        """(x dequantized (C, D) in dtype, q (C, D) E4M3, s (C, ceil(D/128)) float32)."""
        from moeco.fp8.quantize import dequantize_act_1x128

        q = b_CB[:, :dim].contiguous().view(torch.float8_e4m3fn)
        s = b_CB[:, dim:].contiguous().view(torch.float32)
        return dequantize_act_1x128(q, s, dtype), q, s


class MoveRows(torch.autograd.Function):
    """x_TD along a route; forward encoded (codec None: as is), backward in x's precision, reversed.

    Returns (x_CD, q, s): q, s the FP8 payload as received (None without a codec), for experts that
    take pre-quantized input.
    """

    @staticmethod
    def forward(ctx, x, route, codec, counter, kind="dispatch"):
        ctx.route = route
        payload = x if codec is None else codec.encode(x)
        for step in route:
            payload = step.forward(payload, counter, kind) if isinstance(step, AllToAll) else step.forward(payload)
        if codec is None:
            return payload, None, None
        out, q, s = codec.decode(payload, x.shape[-1], x.dtype)
        ctx.mark_non_differentiable(q, s)
        return out, q, s

    @staticmethod
    def backward(ctx, g, _gq, _gs):
        for step in reversed(ctx.route):
            g = step.backward(g.contiguous())
        return g, None, None, None, None


class AllToAllFn(torch.autograd.Function):
    """Differentiable all-to-all of rows (the combine path); backward sends gradients back."""

    @staticmethod
    def forward(ctx, x, step: AllToAll, counter, kind):
        ctx.step = step
        return step.forward(x, counter, kind)

    @staticmethod
    def backward(ctx, g):
        return ctx.step.backward(g.contiguous()), None, None, None


def exchange_counts(send_counts: torch.Tensor, group) -> torch.Tensor:
    """All-to-all of int64 counts, an equal share of `send_counts` to each group member, in member order."""
    out = torch.empty_like(send_counts)
    _collective(lambda: dist.all_to_all_single(out, send_counts.contiguous(), group=group), "count exchange", group)
    return out


def post_rows(x: torch.Tensor, send: list[int], recv: list[int], group):
    """`all_to_all_rows` with `async_op=True`: (the receive buffer, the work handle)."""
    out = x.new_empty((sum(recv), *x.shape[1:]))
    work = _collective(lambda: dist.all_to_all_single(out, x, recv, send, group=group, async_op=True),
                       "all-to-all", group)
    return out, work


def _no_span(kind: str):
    return nullcontext()


class PendingRows:
    """An all-to-all of rows issued with `async_op=True`; `wait()` returns the received rows.

    On NCCL the collective runs on the process group's own stream and `wait()` makes the current stream
    wait on it (the "communication stream with events"); on gloo a background thread carries it.

    Autograd sees two nodes, one made at issue (`_Posted`, fed the rows sent) and one at `wait()`
    (`_Landed`, giving the rows received), joined by an empty tensor. The engine runs nodes in the reverse
    order of their making, so in the backward `_Landed` runs first and *posts* the reverse all-to-all
    of the gradient, whatever was made between issue and wait (the other micro-batch's stages) runs next,
    and `_Posted` *waits* for it: the backward keeps the forward's pairing, mirrored. The gradient is the
    one `AllToAllFn` gives. `link` holds the in-flight state; a scheduler may set `link.span` (to record
    the backward's issue and wait) or `link.asynchronous = False` (the reverse all-to-all whole at
    `_Landed`, the way `AllToAllFn` does it: the reference).
    """

    def __init__(self, x: torch.Tensor, step: AllToAll, counter: TrafficCounter | None, kind: str):
        if counter is not None:
            counter.add(kind, step.peers, step.send, _row_bytes(x))
        self.step = step
        self.link = GradLink(step)
        self.token = _Posted.apply(x, self.link) if x.requires_grad and torch.is_grad_enabled() else None
        self._send = x.detach().contiguous()  # kept alive until the work completes
        self.out, self.work = post_rows(self._send, step.send, step.recv, step.group)

    def wait(self) -> torch.Tensor:
        _collective(self.work.wait, "all-to-all", self.step.group)
        self._send = None
        token, self.token = self.token, None
        if token is not None and torch.is_grad_enabled():
            return _Landed.apply(token, self)
        return self.out


class GradLink:
    """The backward of one PendingRows: `post(g)` at `_Landed`, `take()` at `_Posted`."""

    def __init__(self, step: AllToAll):
        self.step = step
        self.asynchronous = True
        self.span = _no_span  # span("issue" | "wait") -> a context manager around that part
        self.out = self.work = self._send = None

    def post(self, g: torch.Tensor) -> None:
        g, s = g.contiguous(), self.step
        with self.span("issue"):
            if self.asynchronous:
                self._send = g
                self.out, self.work = post_rows(g, s.recv, s.send, s.group)
            else:
                self.out = s.backward(g)
        if not self.asynchronous:
            with self.span("wait"):  # nothing left to wait for: the event order shows it
                pass

    def take(self) -> torch.Tensor:
        if self.work is not None:
            with self.span("wait"):
                _collective(self.work.wait, "all-to-all", self.step.group)
        out = self.out
        self.out = self.work = self._send = None
        return out


class _Posted(torch.autograd.Function):
    """Made at issue: forward gives an empty token; backward waits for the gradient's reverse all-to-all."""

    @staticmethod
    def forward(ctx, src, link):
        ctx.link = link
        return src.new_empty(0)

    @staticmethod
    def backward(ctx, _g):
        return ctx.link.take(), None


class _Landed(torch.autograd.Function):
    """Made at wait: forward gives the received rows; backward posts their gradient's reverse all-to-all."""

    @staticmethod
    def forward(ctx, token, pending):
        ctx.link = pending.link
        return pending.out

    @staticmethod
    def backward(ctx, g):
        ctx.link.post(g)
        return g.new_empty(0), None
