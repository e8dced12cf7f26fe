"""Codecs for what crosses the wire in expert parallelism: dispatch inputs and combine inputs.

A codec turns a (*, D) activation into a payload (what would be sent) and back:

    payload = codec.encode(x)        payload.nbytes: bytes on the wire, metadata included
    x'      = codec.decode(payload)  same shape and dtype as x
    codec.bytes_per_element          wire bytes per element for D a multiple of 128

| name      | per element                  | metadata per 1x128 tile          | bytes/element |
|-----------|------------------------------|----------------------------------|---------------|
| bf16      | the BF16 value               | none                             | 2             |
| e4m3      | FP8 E4M3 of x / s            | s = amax / 448, float32          | 1.03125       |
| e5m2      | FP8 E5M2 of x / s            | s = amax / 57344, float32        | 1.03125       |
| logfmtN   | sign + (N-1)-bit log code    | BF16 max and min of abs(x)       | (N + 0.25)/8  |

bf16 is the identity on BF16 input (a float32 input is rounded to BF16, as the wire would carry it).
E4M3 is `moeco.fp8.quantize`'s 1x128 quantization (DeepSeek-V3's dispatch format); E5M2 is the
same tiling with E5M2's range. `roundtrip(codec, x)` applies encode -> decode with a
straight-through gradient: the forward value is what the receiver sees, and the backward passes
the gradient unchanged (the backward all-to-all carries gradients in its own format).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from moeco.comm import logfmt
from moeco.comm.names import NAMES, parse_codec_name
from moeco.fp8.quantize import BLOCK, _pad_last, dequantize_act_1x128, quantize_act_1x128

E5M2_MAX = 57344.0
AMAX_FLOOR = 1e-4  # as the E4M3 quantization: an all-zero tile keeps a finite scale


class Payload(Protocol):
    @property
    def nbytes(self) -> int: ...


class Codec(Protocol):
    name: str

    @property
    def bytes_per_element(self) -> float: ...

    def encode(self, x: torch.Tensor) -> Payload: ...

    def decode(self, payload: Payload) -> torch.Tensor: ...


@dataclass
class TensorPayload:
    """Payload of the BF16 and FP8 codecs: values plus optional per-tile float32 scales."""

    values: torch.Tensor
    scales: torch.Tensor | None
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = self.values.numel() * self.values.element_size()
        return n + (self.scales.numel() * 4 if self.scales is not None else 0)


class BF16Codec:
    name = "bf16"
    bytes_per_element = 2.0

    def encode(self, x: torch.Tensor) -> TensorPayload:
        return TensorPayload(x.to(torch.bfloat16), None, x.dtype)

    def decode(self, p: TensorPayload) -> torch.Tensor:
        return p.values.to(p.dtype)


class FP8Codec:
    """E4M3 or E5M2 with one float32 scale per 1x128 tile of the last dim."""

    def __init__(self, fmt: str) -> None:
        self.name = fmt
        self.fp8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}[fmt]
        self.bytes_per_element = 1.0 + 4 / BLOCK

    def encode(self, x: torch.Tensor) -> TensorPayload:
        if self.name == "e4m3":
            q, s = quantize_act_1x128(x)
            return TensorPayload(q, s, x.dtype)
        D = x.shape[-1]
        xt = _pad_last(x, -1).reshape(*x.shape[:-1], -1, BLOCK).float()
        s = xt.abs().amax(dim=-1).clamp(min=AMAX_FLOOR) / torch.tensor(E5M2_MAX)
        q = (xt / s.unsqueeze(-1)).to(self.fp8).reshape(*x.shape[:-1], -1)[..., :D].contiguous()
        return TensorPayload(q, s, x.dtype)

    def decode(self, p: TensorPayload) -> torch.Tensor:
        return dequantize_act_1x128(p.values, p.scales, p.dtype)


class LogFMTCodec:
    def __init__(self, bits: int) -> None:
        self.bits = logfmt.check_bits(bits)
        self.name = f"logfmt{bits}"
        self.bytes_per_element = logfmt.bytes_per_element(bits)

    def encode(self, x: torch.Tensor) -> logfmt.LogFMTPayload:
        return logfmt.encode(x, self.bits)

    def decode(self, p: logfmt.LogFMTPayload) -> torch.Tensor:
        return logfmt.decode(p)


def get_codec(name: str | None, field: str = "codec") -> Codec | None:
    """A codec by name (bf16, e4m3, e5m2, logfmt8, logfmt10, logfmtN); "none" or None gives None."""
    kind, bits = parse_codec_name(name, field)
    if kind == "none":
        return None
    if kind == "bf16":
        return BF16Codec()
    if kind in ("e4m3", "e5m2"):
        return FP8Codec(kind)
    return LogFMTCodec(bits)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, codec):
        return codec.decode(codec.encode(x.detach()))

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def roundtrip(codec: Codec | None, x: torch.Tensor) -> torch.Tensor:
    """decode(encode(x)) with a straight-through gradient; x itself when codec is None."""
    if codec is None:
        return x
    return _StraightThrough.apply(x, codec)


__all__ = ["BF16Codec", "Codec", "FP8Codec", "LogFMTCodec", "NAMES", "Payload", "TensorPayload", "get_codec",
           "roundtrip"]
