"""CodecDispatcher: pass the MoE's two wire crossings through codecs, in one process.

In expert parallelism two tensors cross the network in the forward pass (DeepSeek-V3, section 3.3):

    dispatch   x_TD  -> the experts' ranks      (V3: FP8 E4M3 1x128)
    combine    y_CD  -> back to the token's rank, before the weighted sum  (V3: BF16; LogFMT proposed)

This wrapper applies `decode(encode(.))` at exactly those two points around any dispatcher, so the
effect of a wire format on training and on outputs is measurable without a cluster. It codes the
token once before dispatch (a token is sent once per destination and every copy carries the same
bits) and every expert output before combine.

Gradients are straight-through: the backward pass hands the gradient on unchanged, as the forward
value on the wire is the coded one and the backward all-to-all carries gradients in its own format
(BF16 in V3), which this wrapper does not model.
"""

from __future__ import annotations

import torch

from moeco.comm.codec import Codec, get_codec, roundtrip


class CodecDispatcher:
    """Wraps a dispatcher (`dispatch(x_TD, routing, n_experts)`, `combine(y_CD, handle)`)."""

    def __init__(self, inner, dispatch_codec: Codec | str | None = None, combine_codec: Codec | str | None = None):
        self.inner = inner
        self.dispatch_codec = (get_codec(dispatch_codec, "parallel.dispatch_codec")
                               if isinstance(dispatch_codec, str) or dispatch_codec is None else dispatch_codec)
        self.combine_codec = (get_codec(combine_codec, "parallel.combine_codec")
                              if isinstance(combine_codec, str) or combine_codec is None else combine_codec)

    def dispatch(self, x_TD: torch.Tensor, routing, n_experts: int):
        return self.inner.dispatch(roundtrip(self.dispatch_codec, x_TD), routing, n_experts)

    def combine(self, y_CD: torch.Tensor, handle) -> torch.Tensor:
        return self.inner.combine(roundtrip(self.combine_codec, y_CD), handle)


def apply_codecs(model: torch.nn.Module, dispatch_codec: str | None, combine_codec: str | None) -> int:
    """Wrap the dispatcher of every MoE layer of `model` (MTP layers included); returns how many.

    "none" (or None) for both leaves the model untouched.
    """
    d = get_codec(dispatch_codec, "parallel.dispatch_codec")
    c = get_codec(combine_codec, "parallel.combine_codec")
    if d is None and c is None:
        return 0
    n = 0
    for _, moe in model.moe_layers():
        moe.dispatcher = CodecDispatcher(moe.dispatcher, d, c)
        n += 1
    return n


__all__ = ["CodecDispatcher", "apply_codecs"]
