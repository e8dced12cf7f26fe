"""Fp8Linear: a Linear whose three GEMMs run in FP8 with fine-grained scales (DeepSeek-V3 3.3).

    x (T, K), W (N, K) master weight (FP32/BF16), y (T, N), T = all leading dims flattened

    Fprop  y  = x . W^T      x: 1x128 tiles along K     W: 128x128 blocks
    Dgrad  dx = dy . W       dy: 1x128 tiles along N    W^T: the same 128x128 blocks, transposed
    Wgrad  dW = dy^T . x     dy^T and x^T: 1x128 tiles along T (both scaled along the tokens)

Outputs are in x's dtype (dx too) and dW in W's dtype: FP8 lives only inside the GEMMs, the
module keeps nn.Linear's `weight` (and `bias`) parameters, so state dicts are unchanged.
For backward it saves the FP8 activations and their scales, not x: Wgrad dequantizes them and
re-tiles 1x128 -> 128x1 (the report's re-quantization, the cost its hardware wishlist names).
In eval mode the FP8 weight is cached while the master weight is unchanged (same `_version`), so
inference quantizes it once; in training it is re-quantized every forward, because optimizers
such as fused AdamW update weights in place without bumping `_version`, except inside the
recipe's `weight_cache()` block: there each weight of the recipe's layers (Linear or grouped
experts) is quantized at its first forward and reused until the block ends. The trainer opens one
around the micro-steps of an optimizer step (`train.fp8_weight_cache`), so with gradient
accumulation the weights are quantized once per optimizer step, not once per micro-step.

`fp8_grouped_mm` is the same three GEMMs for routed experts: tokens sorted by expert, `offs` the
cumulative end row of each expert (torch._grouped_mm's convention). Activations and gradients are
quantized once for all tokens (their tiles are per token), the (E, N, K) weights per expert block.
On CUDA with Triton, Fprop, Dgrad and Wgrad are each one grouped kernel launch for all experts
(`triton_kernels.fp8_grouped_gemm_nt`, `grouped_wgrad.fp8_grouped_wgrad`; no host sync); elsewhere,
or with the recipe's grouped_kernel="loop", one FP8 GEMM per expert (`compute.grouped_impl` says which).

Eager calls run through the autograd.Functions here; under torch.compile the same functions
(`moeco.fp8.compute`) run as custom operators (`moeco.fp8.ops`), so compiled blocks keep the FP8
layers without a graph break.
"""

from __future__ import annotations

import torch
from torch import nn

from moeco.fp8 import ops  # noqa: F401  (registers torch.ops.moeco_fp8)
from moeco.fp8.compute import grouped_backward, grouped_forward, linear_backward, linear_forward
from moeco.fp8.gemm import fp8_gemm
from moeco.fp8.quantize import dequantize_weight_128x128, quantize_act_1x128, quantize_weight_128x128
from moeco.fp8.spec import Fp8Spec, Kernels, WeightCache


def _grouped_weight(w: torch.Tensor, weight_pow2: bool, cache: WeightCache | None):
    """(wq (E, N, K), ws (E, NB, KB), W^T q (E, K, N)); from `cache` when its block is open."""
    # Only parameters (leaves that take gradients) are cached: a temporary's memory, and so its
    # data_ptr, can belong to another tensor later in the same block.
    cached = cache is not None and cache.depth > 0 and w.is_leaf and w.requires_grad
    key = (w.data_ptr(), tuple(w.shape), w.dtype, weight_pow2)
    if cached and key in cache.grouped:
        return cache.grouped[key]
    with torch.no_grad():  # (E, N, K), (E, NB, KB), and W_e^T (E, K, N) for Dgrad, one kernel on CUDA
        out = quantize_weight_128x128(w.detach(), pow2_scale=weight_pow2, transposed=True)
    if cached:
        cache.grouped[key] = out
    return out


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    # Under autocast the GEMM writes the autocast dtype, as nn.Linear would; otherwise x's dtype.
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


class _Fp8LinearFn(torch.autograd.Function):
    """The eager path of Fp8Linear (cheaper to call than the custom operator, which compiled code uses)."""

    @staticmethod
    def forward(ctx, x2, weight, wq, ws, wtq, act_pow2: bool, kernels: Kernels, out_dtype: torch.dtype):
        y, xq, xs = linear_forward(x2, wq, ws, act_pow2, kernels, out_dtype)
        ctx.save_for_backward(xq, xs, wtq, ws)
        ctx.meta = (x2.dtype, weight.dtype, act_pow2, kernels)
        return y

    @staticmethod
    def backward(ctx, gy):
        dx, dw = linear_backward(gy, *ctx.saved_tensors, *ctx.meta, ctx.needs_input_grad[0],
                                 ctx.needs_input_grad[1])
        return dx, dw, None, None, None, None, None, None


class Fp8Linear(nn.Linear):
    """nn.Linear with FP8 Fprop/Dgrad/Wgrad; see the module docstring. `recipe`: an Fp8Recipe (any
    `Fp8Spec`); None: DeepSeek-V3's defaults."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, recipe: Fp8Spec | None = None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = recipe if recipe is not None else Fp8Spec()
        self._wcache: tuple | None = None

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(q (N, K), scale (NB, KB)); in training recomputed every call (once per `weight_cache()`
        block inside one), in eval cached per weight version.

        Training cannot trust the version counter: fused AdamW (the default on CUDA) updates the
        weights in place without bumping `_version`, and a stale FP8 copy silently freezes every
        Linear (measured: +7.5% loss on `tiny` on an H200 before this rule).
        """
        w = self.weight
        if self.training:
            cache = self.recipe.step_cache
            key = ("step", cache.generation, w.data_ptr(), w.dtype) if cache.depth else None
        else:
            key = (w.data_ptr(), w._version, w.device, w.dtype)
        if key is None or self._wcache is None or self._wcache[0] != key:
            with torch.no_grad():  # W and W^T (the Dgrad operand), one kernel on CUDA
                wq, ws, wtq = quantize_weight_128x128(w, pow2_scale=self.recipe.weight_pow2, transposed=True)
            self._wcache = (key, wq, ws, wtq)
        return self._wcache[1], self._wcache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = x.shape[-1]
        r = self.recipe
        if torch.compiler.is_compiling():  # one opaque custom operator (the weight cache reads data_ptr)
            wq, ws, wtq = torch.ops.moeco_fp8.quant_weight(self.weight.detach(), r.weight_pow2)
            y, _, _ = torch.ops.moeco_fp8.linear(x.reshape(-1, K), self.weight, wq, ws, wtq, r.act_pow2, r.kernel_key,
                                                 _out_dtype(x))
        else:
            self.quantized_weight()
            wq, ws, wtq = self._wcache[1:]
            y = _Fp8LinearFn.apply(x.reshape(-1, K), self.weight, wq, ws, wtq, r.act_pow2, r.kernels, _out_dtype(x))
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8={self.recipe.name}"


class _Fp8GroupedFn(torch.autograd.Function):
    """The eager path of fp8_grouped_mm (the custom operator `moeco_fp8::grouped` is the compiled one)."""

    @staticmethod
    def forward(ctx, x, w, offs, act_pow2: bool, weight_pow2: bool, kernels: Kernels, out_dtype: torch.dtype,
                cache: WeightCache, x_fp8=None):
        wq, ws, wtq = _grouped_weight(w, weight_pow2, cache)
        y, xq, xs, wtq, ws = grouped_forward(x, wq, ws, wtq, offs, act_pow2, kernels, out_dtype, x_fp8)
        ctx.save_for_backward(xq, xs, wtq, ws, offs)
        ctx.meta = (tuple(w.shape), act_pow2, kernels, x.dtype, w.dtype)
        return y

    @staticmethod
    def backward(ctx, gy):
        w_shape, act_pow2, kernels, x_dtype, w_dtype = ctx.meta
        dx, dw = grouped_backward(gy.contiguous(), *ctx.saved_tensors, w_shape, act_pow2, kernels, x_dtype, w_dtype,
                                  ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dx, dw, None, None, None, None, None, None, None


# Under torch.compile (`train.compile`) the FP8 GEMMs run as custom operators (`moeco.fp8.ops`): each
# is one opaque node, so a compiled block keeps them in its graph without a break, and Inductor never
# tries to lower block-scaled `_scaled_mm` (torch 2.11 cannot: "Inductor Triton does not support
# scale_a.shape = ...", seen on the H200). Eager calls take the autograd.Functions above, which run the
# same helpers with less dispatch cost (a custom operator call costs ~20 us more on the host).
def fp8_grouped_mm(x_TK: torch.Tensor, w_ENK: torch.Tensor, offs: torch.Tensor, *,
                   recipe: Fp8Spec | None = None, x_fp8: tuple | None = None) -> torch.Tensor:
    """y[rows of e] = x[rows of e] . w[e]^T in FP8; offs (E,) int cumulative end rows; y (T, N).
    `recipe`: an Fp8Recipe (its weight_cache() block applies); None: DeepSeek-V3's defaults.
    x_fp8: (xq, xs), x already quantized 1x128 (an FP8 dispatch payload): the GEMM takes it as it is,
    and x only carries the gradient (dx is computed from dy and W, as without it)."""
    r = recipe if recipe is not None else Fp8Spec()
    if torch.compiler.is_compiling() and x_fp8 is None:
        return torch.ops.moeco_fp8.grouped(x_TK, w_ENK, offs, r.act_pow2, r.weight_pow2, r.kernel_key,
                                           _out_dtype(x_TK))[0]
    return _Fp8GroupedFn.apply(x_TK, w_ENK, offs, r.act_pow2, r.weight_pow2, r.kernels, _out_dtype(x_TK),
                               r.step_cache, x_fp8)


class Fp8InferenceLinear(nn.Module):
    """A Linear that keeps DeepSeek's FP8 checkpoint weights as they are: half BF16's memory.

    Buffers `weight` (N, K) float8_e4m3fn and `weight_scale_inv` (ceil(N/128), ceil(K/128))
    float32, the names of the official checkpoints. CUDA: FP8 GEMM on 1x128-quantized inputs;
    CPU: the weight is dequantized and the matmul runs in the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, backend: str = "auto",
                 device=None):
        super().__init__()
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        nb, kb = -(-out_features // 128), -(-in_features // 128)
        self.register_buffer("weight", torch.zeros((out_features, in_features), dtype=torch.float8_e4m3fn,
                                                   device=device))
        self.register_buffer("weight_scale_inv", torch.ones((nb, kb), dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, backend: str = "auto") -> "Fp8InferenceLinear":
        m = cls(linear.in_features, linear.out_features, linear.bias is not None, backend=backend,
                device=linear.weight.device)
        with torch.no_grad():
            q, s = quantize_weight_128x128(linear.weight)
            m.weight.copy_(q)
            m.weight_scale_inv.copy_(s)
            if linear.bias is not None:
                m.bias.copy_(linear.bias)
        return m

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight_128x128(self.weight, self.weight_scale_inv, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda or self.backend == "reference":  # "reference" on CPU emulates the CUDA arithmetic
            x2 = x.reshape(-1, self.in_features)
            xq, xs = quantize_act_1x128(x2)
            y = fp8_gemm(xq, xs, self.weight, self.weight_scale_inv, x.dtype, backend=self.backend)
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            y = x @ self.dequantized_weight(x.dtype).t()
        return y if self.bias is None else y + self.bias.to(y.dtype)
