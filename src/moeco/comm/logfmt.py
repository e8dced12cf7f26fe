"""LogFMT-nBit: the public encode/decode, choosing the Triton kernel (moeco.comm.logfmt_triton) or the
plain-PyTorch reference (moeco.comm.logfmt_ref, where the format and its derivation are defined)."""

from __future__ import annotations

import torch

from moeco.comm import logfmt_triton
from moeco.comm.logfmt_ref import (  # noqa: F401  (the format's names, re-exported)
    TILE,
    RANGE_LOG2,
    LOG2_COEF,
    EXP2_COEF,
    check_bits,
    bytes_per_element,
    log2_f32,
    exp2_f32,
    LogFMTPayload,
    tile_log_range,
    encode_codes,
    decode_magnitudes,
    encode_reference,
    decode_reference,
)
from moeco.errors import ConfigError


def _use_triton(x: torch.Tensor, impl: str) -> bool:
    if impl not in ("auto", "reference", "triton"):
        raise ConfigError(f"LogFMT impl = {impl!r} is invalid: choose auto, reference or triton")
    if impl == "reference":
        return False
    ok = logfmt_triton.available(x.device)
    if impl == "triton" and not ok:
        raise ConfigError("LogFMT impl = 'triton' needs Triton on a CUDA device, or TRITON_INTERPRET=1 on CPU; "
                          "use impl='reference'")
    return ok if impl == "triton" else (ok and x.is_cuda)


def encode(x: torch.Tensor, bits: int = 8, *, impl: str = "auto") -> LogFMTPayload:
    """LogFMT-n encode x (*, D) per 1x128 tile of the last dim. impl: auto (Triton on CUDA, else the
    reference) | reference | triton (also on CPU under TRITON_INTERPRET=1)."""
    check_bits(bits)
    if _use_triton(x, impl):
        return logfmt_triton.encode(x, bits)
    return encode_reference(x, bits)


def decode(p: LogFMTPayload, *, impl: str = "auto") -> torch.Tensor:
    """Inverse of `encode` (up to the format's rounding): (*, D) in the input's dtype."""
    if _use_triton(p.magnitudes, impl):
        return logfmt_triton.decode(p)
    return decode_reference(p)


__all__ = ["LogFMTPayload", "TILE", "bytes_per_element", "decode", "decode_reference", "encode",
           "encode_reference", "exp2_f32", "log2_f32"]
