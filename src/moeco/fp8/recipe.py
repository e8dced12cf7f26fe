"""The precision recipe, chosen by name at build time: `recipe_by_name("fp8" | "bf16" | "fp32")`.

A recipe is what the model asks for every Linear it builds and for the routed experts' GEMM
(the protocol of `moeco.precision`):

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
    backend, gemm_kernel, quant_kernel, grouped_kernel, grouped_wgrad_kernel, tma
                              which kernels run (`moeco.fp8.spec` says what each value does); the
                              same on every rank, whatever the rank's environment

The block shapes are names for what the kernels do, not knobs: other values are rejected, and the
error says which are implemented. Master weights stay FP32 (or BF16) `nn.Linear` parameters, so
state dicts and checkpoints do not depend on the recipe.

The kernel choices can be given as environment variables to the command that builds the recipe
(`moeco train` reads them once, through `recipe_by_name(name, environ=os.environ)`):

    MOECO_FP8_GEMM=auto|wgmma|cublas            gemm_kernel
    MOECO_FP8_QUANT=auto|cuda|triton            quant_kernel
    MOECO_FP8_GROUPED=auto|triton|loop|fbgemm   grouped_kernel
    MOECO_FP8_GROUPED_WGRAD=(the same values)   grouped_wgrad_kernel
    MOECO_FP8_TMA=0|1                           tma
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from moeco.errors import ConfigError
from moeco.fp8.linear import Fp8Linear, fp8_grouped_mm
from moeco.fp8.spec import GEMM_KERNELS, GROUPED_KERNELS, QUANT_KERNELS, Fp8Spec
from moeco.precision import ROLES, HighPrecision

# environment variable -> (Fp8Recipe field, valid values)
ENV_FIELDS = {
    "MOECO_FP8_GEMM": ("gemm_kernel", GEMM_KERNELS),
    "MOECO_FP8_QUANT": ("quant_kernel", QUANT_KERNELS),
    "MOECO_FP8_GROUPED": ("grouped_kernel", GROUPED_KERNELS),
    "MOECO_FP8_GROUPED_WGRAD": ("grouped_wgrad_kernel", GROUPED_KERNELS),
    "MOECO_FP8_TMA": ("tma", ("0", "1")),
}


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
class Fp8Recipe(Fp8Spec):
    """DeepSeek-V3's FP8 recipe; see the module docstring for every field."""

    high_precision_roles: frozenset[str] = field(default_factory=lambda: frozenset({"head"}))

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "high_precision_roles", frozenset(self.high_precision_roles))
        bad = sorted(set(self.high_precision_roles) - set(ROLES))
        if bad:
            raise ConfigError(f"Fp8Recipe.high_precision_roles has unknown roles {bad}; valid: {', '.join(ROLES)}")
        if "head" not in self.high_precision_roles:
            raise ConfigError("Fp8Recipe.high_precision_roles must keep 'head' (the output head stays "
                              "in higher precision in DeepSeek-V3's recipe)")

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


def fields_from_env(environ: Mapping[str, str]) -> dict:
    """Fp8Recipe fields from the MOECO_FP8_* variables set in `environ` (see the module docstring);
    a bad value is a one-line ConfigError naming the variable."""
    out = {}
    for var, (name, valid) in ENV_FIELDS.items():
        value = environ.get(var)
        if value is None or value.strip() == "":
            continue
        value = value.strip().lower()
        if value not in valid:
            raise ConfigError(f"{var}={value!r}: expected {', '.join(valid[:-1])} or {valid[-1]}")
        out[name] = value == "1" if name == "tma" else value
    return out


def recipe_by_name(name: str, *, environ: Mapping[str, str] | None = None):
    """`--precision` values: "fp8" (DeepSeek-V3's recipe), "fp8-ue8m0" (power-of-two scales), "bf16", "fp32".
    `environ` (e.g. os.environ): take the FP8 recipe's kernel choices from its MOECO_FP8_* variables."""
    if name in ("fp8", "fp8-ue8m0"):
        env = fields_from_env(environ) if environ is not None else {}
        if name == "fp8-ue8m0":
            return Fp8Recipe(name=name, scale_format="ue8m0", weight_scale_format="ue8m0", **env)
        return Fp8Recipe(**env)
    if name == "bf16":
        return HighPrecisionRecipe("bf16", torch.bfloat16)
    if name == "fp32":
        return HighPrecisionRecipe("fp32", torch.float32)
    raise ConfigError(f"precision {name!r} is unknown; valid: fp8, fp8-ue8m0, bf16, fp32")


__all__ = ["ENV_FIELDS", "ROLES", "Fp8Recipe", "HighPrecisionRecipe", "fields_from_env", "recipe_by_name"]
