"""What an FP8 recipe fixes for the layers that run it: formats, scale formats and kernel choices.

`Fp8Spec` is the data part of `moeco.fp8.recipe.Fp8Recipe` (which adds the factory methods the model
calls); Fp8Linear and fp8_grouped_mm read it. Every field is validated when the spec is built, so
that a bad value is a one-line error at build time and every rank of a job makes the same choice.

    format, block shapes   E4M3; act (1, 128), weight (128, 128), grad (1, 128), wgrad (128, 1);
                           promotion every 128 of K. Names for what the kernels do: other values
                           are rejected.
    scale_format           "fp32" or "ue8m0" (powers of two, rounded up); weight_scale_format too
    backend                the per-GEMM backend of `fp8_gemm`: auto, reference, scaled_mm, triton, wgmma
    gemm_kernel            "auto": moeco's Hopper kernel where cuBLAS would pad, and for the experts'
                           Wgrad; "wgmma": wherever it applies; "cublas": never (env MOECO_FP8_GEMM)
    quant_kernel           the 128x1 and dual quantizations on CUDA: "auto" (the NVRTC kernel where it
                           applies), "cuda" (required), "triton" (env MOECO_FP8_QUANT)
    grouped_kernel         the routed experts' GEMMs: "auto", "triton", "loop", "fbgemm"
                           (env MOECO_FP8_GROUPED); grouped_wgrad_kernel: their Wgrad, None = the same
                           (env MOECO_FP8_GROUPED_WGRAD)
    tma                    Triton's TMA kernels on Hopper where they apply (env MOECO_FP8_TMA=0: off)

`Kernels` is the kernel choices as one value (and, as `Kernels.key`, one string for the custom
operators). `WeightCache` is the state of a recipe's `weight_cache()` block.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from moeco.errors import ConfigError

BACKENDS = ("auto", "reference", "scaled_mm", "triton", "wgmma")
GEMM_KERNELS = ("auto", "wgmma", "cublas")
QUANT_KERNELS = ("auto", "cuda", "triton")
GROUPED_KERNELS = ("auto", "triton", "loop", "fbgemm")
SCALE_FORMATS = ("fp32", "ue8m0")


class Kernels(NamedTuple):
    """The kernel choices of a spec (see the module docstring), passed down to the GEMMs."""

    backend: str = "auto"
    gemm: str = "auto"
    quant: str = "auto"
    grouped: str = "auto"
    grouped_wgrad: str = "auto"
    tma: bool = True

    @property
    def key(self) -> str:
        """One string for a custom operator's argument: "backend,gemm,quant,grouped,grouped_wgrad,tma"."""
        return ",".join([*self[:5], str(int(self.tma))])

    @classmethod
    def from_key(cls, key: str) -> "Kernels":
        *names, tma = key.split(",")
        return cls(*names, tma == "1")


class WeightCache:
    """The state of a `weight_cache()` block: nesting depth, a generation that changes whenever the
    outermost block opens or closes (so a key taken in one block never matches in another), and the
    grouped weights quantized in this block, by (data_ptr, shape, dtype, pow2). A context manager."""

    def __init__(self):
        self.depth = 0
        self.generation = 0
        self.grouped: dict = {}

    def __enter__(self) -> "WeightCache":
        if self.depth == 0:
            self.generation += 1
        self.depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.generation += 1
            self.grouped.clear()


def _check_choice(owner: str, name: str, value, valid: tuple) -> None:
    if value not in valid:
        raise ConfigError(f"{owner}.{name}={value!r}; valid: {', '.join(valid)}")


@dataclass(frozen=True)
class Fp8Spec:
    """DeepSeek-V3's FP8 recipe as data; see the module docstring for every field."""

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
    gemm_kernel: str = "auto"
    quant_kernel: str = "auto"
    grouped_kernel: str = "auto"
    grouped_wgrad_kernel: str | None = None
    tma: bool = True
    dtype: torch.dtype = torch.bfloat16  # activations between the FP8 GEMMs
    # derived in __post_init__; the cache is this recipe's own, never compared or copied by replace()
    kernels: Kernels = field(init=False, repr=False, compare=False)
    kernel_key: str = field(init=False, repr=False, compare=False)  # kernels.key, for the custom operators
    step_cache: WeightCache = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        owner = type(self).__name__
        want = {"fmt": "e4m3", "act_block": (1, 128), "weight_block": (128, 128), "grad_block": (1, 128),
                "wgrad_block": (128, 1), "promotion_interval": 128}
        why = {"grad_block": " ((128, 128) gradient blocks made a 16B MoE diverge: DeepSeek-V3 App. B.2)"}
        for name, value in want.items():
            got = getattr(self, name)
            if (tuple(got) if isinstance(got, (tuple, list)) else got) != value:
                raise ConfigError(f"{owner}.{name}={got!r} is not implemented; use {value!r}{why.get(name, '')}")
        for name in ("scale_format", "weight_scale_format"):
            _check_choice(owner, name, getattr(self, name), SCALE_FORMATS)
        _check_choice(owner, "backend", self.backend, BACKENDS)
        _check_choice(owner, "gemm_kernel", self.gemm_kernel, GEMM_KERNELS)
        _check_choice(owner, "quant_kernel", self.quant_kernel, QUANT_KERNELS)
        _check_choice(owner, "grouped_kernel", self.grouped_kernel, GROUPED_KERNELS)
        if self.grouped_wgrad_kernel is not None:
            _check_choice(owner, "grouped_wgrad_kernel", self.grouped_wgrad_kernel, GROUPED_KERNELS)
        if not isinstance(self.tma, bool):
            raise ConfigError(f"{owner}.tma={self.tma!r}; valid: True, False")
        object.__setattr__(self, "kernels", Kernels(self.backend, self.gemm_kernel, self.quant_kernel,
                                                    self.grouped_kernel,
                                                    self.grouped_wgrad_kernel or self.grouped_kernel, self.tma))
        object.__setattr__(self, "kernel_key", self.kernels.key)
        object.__setattr__(self, "step_cache", WeightCache())

    @property
    def act_pow2(self) -> bool:
        return self.scale_format == "ue8m0"

    @property
    def weight_pow2(self) -> bool:
        return self.weight_scale_format == "ue8m0"

    def weight_cache(self) -> WeightCache:
        """Quantize each FP8 weight this recipe's layers use once inside the block (at its first
        forward) and reuse it: `with recipe.weight_cache(): ...` around the forwards of one optimizer
        step. The master weights must not change inside the block (the optimizer steps after it
        closes). Eager only; compiled code quantizes every call. Holds W and W^T in FP8 (2 bytes per
        parameter) until the block closes."""
        return self.step_cache


__all__ = ["BACKENDS", "GEMM_KERNELS", "GROUPED_KERNELS", "QUANT_KERNELS", "SCALE_FORMATS", "Fp8Spec", "Kernels",
           "WeightCache"]
