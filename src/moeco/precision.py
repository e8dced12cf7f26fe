"""Precision recipes: how the model builds its Linears and runs its routed experts' GEMM.

The model never chooses a number format itself. It asks a recipe, at build time, for every Linear
and for the experts' grouped GEMM:

    recipe.make_linear(in_features, out_features, *, bias=False, role=...) -> nn.Module
    recipe.grouped_mm(x_TK, w_ENK, offs) -> y_TN       y[rows of e] = x[rows of e] . w[e]^T
    recipe.make_experts(n_experts, dim, hidden)         optional: a module replacing GroupedExperts

    x_TK   tokens sorted by expert, T x K;  w_ENK  E experts' (N, K) weights;
    offs   (E,) int cumulative end row of each expert (torch._grouped_mm's convention)

`role` says what a Linear is for (one of ROLES), so that a recipe can keep some of them in higher
precision (DeepSeek-V3 keeps the output head in BF16). `HighPrecision` is the plain recipe:
nn.Linear and a BF16/FP32 grouped GEMM; `moeco.fp8` implements the FP8 ones. This module imports
nothing of moeco's, so the model depends on it and never on `moeco.fp8`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

ROLES = ("attn_proj", "mlp", "shared_expert", "head", "mtp_proj")


class Recipe(Protocol):
    """What the model needs from a precision recipe (see the module docstring). A recipe may also
    define `make_experts(n_experts, dim, hidden) -> nn.Module` to supply the routed experts itself."""

    name: str

    def make_linear(self, in_features: int, out_features: int, *, bias: bool = False,
                    role: str = "mlp") -> nn.Module: ...

    def grouped_mm(self, x_TK: torch.Tensor, w_ENK: torch.Tensor, offs: torch.Tensor) -> torch.Tensor: ...


def grouped_mm_reference(x_TK: torch.Tensor, w_ENK: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """y[rows of expert e] = x[rows of e] @ w[e].T, tokens sorted by expert, `offs` = cumulative ends."""
    out = x_TK.new_empty(x_TK.shape[0], w_ENK.shape[1])
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:  # decode batches leave most experts empty
            out[start:end] = F.linear(x_TK[start:end], w_ENK[e])
        start = end
    return out


def grouped_mm(x_TK: torch.Tensor, w_ENK: torch.Tensor, offs: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Grouped GEMM: one `torch._grouped_mm` on CUDA (bf16), a per-expert F.linear loop otherwise.

    On CPU, torch 2.13's _grouped_mm runs about 4x slower than the loop for 32 experts x 128 tokens; `backend="grouped_mm"` forces it (tests compare both paths).
    """
    if torch.is_autocast_enabled(x_TK.device.type):  # 3-D weights are not nn.Linear: cast like autocast would
        dtype = torch.get_autocast_dtype(x_TK.device.type)
        x_TK, w_ENK = x_TK.to(dtype), w_ENK.to(dtype)
    use_grouped = backend == "grouped_mm" or (
        backend == "auto" and x_TK.is_cuda and x_TK.dtype == torch.bfloat16 == w_ENK.dtype)
    if use_grouped and hasattr(torch, "_grouped_mm") and x_TK.shape[0] > 0:
        return torch._grouped_mm(x_TK, w_ENK.transpose(-2, -1), offs=offs)
    return grouped_mm_reference(x_TK, w_ENK, offs)


class HighPrecision:
    """The plain recipe: nn.Linear everywhere and a BF16/FP32 grouped GEMM for the experts."""

    name = "high-precision"

    def make_linear(self, in_features: int, out_features: int, *, bias: bool = False, role: str = "mlp") -> nn.Module:
        return nn.Linear(in_features, out_features, bias=bias)

    def grouped_mm(self, x_TK: torch.Tensor, w_ENK: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return grouped_mm(x_TK, w_ENK, offs)


DEFAULT_RECIPE = HighPrecision()

__all__ = ["DEFAULT_RECIPE", "ROLES", "HighPrecision", "Recipe", "grouped_mm", "grouped_mm_reference"]
