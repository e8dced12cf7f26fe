"""The E4M3 format and the block size every FP8 module shares (no imports of moeco's)."""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite E4M3 value
AMAX_FLOOR = 1e-4  # as DeepSeek's act_quant: keeps the scale of an all-zero tile finite
BLOCK = 128


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["AMAX_FLOOR", "BLOCK", "FP8_DTYPE", "FP8_MAX", "ceil_div"]
