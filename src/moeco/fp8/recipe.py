"""The precision recipe, chosen by name at build time: `recipe_by_name("fp8" | "bf16" | "fp32")`.

A recipe is what the model asks for every Linear it builds and for the routed experts' GEMM:

    recipe.make_linear(in_features, out_features, *, bias=False, role=...) -> nn.Module
    recipe.grouped_mm(x_TK, w_ENK, offs) -> y_TN         y[rows of e] = x[rows of e] . w[e]^T

`Fp8Recipe` is DeepSeek-V3's fine-grained recipe (tech report 3.3), frozen and validated:

    format        E4M3 for every tensor (no E5M2 for gradients)
    act_block     (1, 128)    activations, Fprop input                        per token, 128 channels
    weight_block  (128, 128)  weights, Fprop and Dgrad (the same blocks, transposed)
    grad_block    (1, 128)    output gradients, Dgrad input; (128, 128) made a 16B MoE diverge
    wgrad_block   (128, 1)    Wgrad inputs dy^T and x^T, scaled along the tokens
    scale_format  "fp32" or "ue8m0" (powers of two, rounded up)
    promotion_interval  128   FP32 accumulation of every 128 of K (the GEMM backends implement 128)
    high_precision_roles      Linear roles kept in BF16/FP32: the output head. The embedding,
                              router, norms and attention core never go through make_linear.

The block shapes are names for what the kernels do, not knobs: other values are rejected, and the
error says which are implemented. Master weights stay FP32 (or BF16) `nn.Linear` parameters, so
state dicts and checkpoints do not depend on the recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from moeco.errors import ConfigError
from moeco.fp8.gemm import BACKENDS
from moeco.fp8.linear import Fp8Linear, fp8_grouped_mm
from moeco.model.layers import HighPrecision

ROLES = ("attn_proj", "mlp", "shared_expert", "head", "mtp_proj")
SCALE_FORMATS = ("fp32", "ue8m0")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ConfigError(f"Linear role {role!r} is unknown; valid roles: {', '.join(ROLES)}")


@dataclass(frozen=True)
class HighPrecisionRecipe(HighPrecision):
    """The BF16 / FP32 recipes: plain nn.Linear and torch._grouped_mm. `dtype` is the compute dtype
    the trainer runs the model in (master weights stay FP32 either way)."""

    name: str = "bf16"
    dtype: torch.dtype = torch.bfloat16

    def make_linear(self, in_features: int, out_features: int, *, bias: bool = False, role: str = "mlp") -> nn.Module:
        _check_role(role)
        return super().make_linear(in_features, out_features, bias=bias, role=role)


@dataclass(frozen=True)
class Fp8Recipe:
    """DeepSeek-V3's FP8 recipe; see the module docstring for every field."""

    name: str = "fp8"
    fmt: str = "e4m3"
    act_block: tuple[int, int] = (1, 128)
    weight_block: tuple[int, int] = (128, 128)
    grad_block: tuple[int, int] = (1, 128)
    wgrad_block: tuple[int, int] = (128, 1)
    scale_format: str = "fp32"
    weight_scale_format: str = "fp32"
    promotion_interval: int = 128
    backend: str = "auto"
    high_precision_roles: frozenset[str] = field(default_factory=lambda: frozenset({"head"}))
    dtype: torch.dtype = torch.bfloat16  # activations between the FP8 GEMMs

    def __post_init__(self):
        want = {"fmt": "e4m3", "act_block": (1, 128), "weight_block": (128, 128), "grad_block": (1, 128),
                "wgrad_block": (128, 1), "promotion_interval": 128}
        why = {"grad_block": " ((128, 128) gradient blocks made a 16B MoE diverge: DeepSeek-V3 App. B.2)"}
        for name, value in want.items():
            got = getattr(self, name)
            if (tuple(got) if isinstance(got, (tuple, list)) else got) != value:
                raise ConfigError(f"Fp8Recipe.{name}={got!r} is not implemented; use {value!r}{why.get(name, '')}")
        for name in ("scale_format", "weight_scale_format"):
            if getattr(self, name) not in SCALE_FORMATS:
                raise ConfigError(f"Fp8Recipe.{name}={getattr(self, name)!r}; valid: {', '.join(SCALE_FORMATS)}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"Fp8Recipe.backend={self.backend!r}; valid: {', '.join(BACKENDS)}")
        object.__setattr__(self, "high_precision_roles", frozenset(self.high_precision_roles))
        bad = sorted(set(self.high_precision_roles) - set(ROLES))
        if bad:
            raise ConfigError(f"Fp8Recipe.high_precision_roles has unknown roles {bad}; valid: {', '.join(ROLES)}")
        if "head" not in self.high_precision_roles:
            raise ConfigError("Fp8Recipe.high_precision_roles must keep 'head' (the output head stays "
                              "in higher precision in DeepSeek-V3's recipe)")

    @property
    def act_pow2(self) -> bool:
        return self.scale_format == "ue8m0"

    @property
    def weight_pow2(self) -> bool:
        return self.weight_scale_format == "ue8m0"

    def make_linear(self, in_features: int, out_features: int, *, bias: bool = False, role: str = "mlp") -> nn.Module:
        _check_role(role)
        if role in self.high_precision_roles:
            return nn.Linear(in_features, out_features, bias=bias)
        return Fp8Linear(in_features, out_features, bias=bias, recipe=self)

    def grouped_mm(self, x_TK: torch.Tensor, w_ENK: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        return fp8_grouped_mm(x_TK, w_ENK, offs, recipe=self)

    def grouped_mm_fp8(self, x_TK: torch.Tensor, xq_TK: torch.Tensor, xs_TB: torch.Tensor, w_ENK: torch.Tensor,
                       offs: torch.Tensor) -> torch.Tensor:
        """grouped_mm on x already quantized 1x128 (xq, xs), used without re-quantizing; x carries the grad."""
        return fp8_grouped_mm(x_TK, w_ENK, offs, recipe=self, x_fp8=(xq_TK, xs_TB))


def recipe_by_name(name: str):
    """`--precision` values: "fp8" (DeepSeek-V3's recipe), "fp8-ue8m0" (power-of-two scales), "bf16", "fp32"."""
    if name == "fp8":
        return Fp8Recipe()
    if name == "fp8-ue8m0":
        return Fp8Recipe(name=name, scale_format="ue8m0", weight_scale_format="ue8m0")
    if name == "bf16":
        return HighPrecisionRecipe("bf16", torch.bfloat16)
    if name == "fp32":
        return HighPrecisionRecipe("fp32", torch.float32)
    raise ConfigError(f"precision {name!r} is unknown; valid: fp8, fp8-ue8m0, bf16, fp32")
