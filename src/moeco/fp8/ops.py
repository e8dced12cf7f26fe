"""The FP8 recipe's kernels as PyTorch custom operators (`torch.ops.moeco_fp8.*`), for torch.compile.

torch.compile treats a custom operator as one opaque node: it neither breaks the graph at it nor
tries to lower what is inside (Inductor in torch 2.11 cannot lower block-scaled `_scaled_mm`, and
it should not re-generate our Triton kernels). So a compiled block keeps the FP8 Linears and the
grouped expert GEMM inside one graph, and fuses the element-wise work around them. Eager calls
take the autograd.Functions of `moeco.fp8.linear` instead (a custom operator costs ~20 us more per
call on the host); both run the same helper functions, so compiled and eager results agree
(tests/test_fp8_linear.py).

Every operator has a fake (meta) implementation that gives the real outputs' shapes, dtypes and
strides; the real implementations return exactly those layouts on every device:

    quant_weight(w (*, N, K), pow2)  -> q (*, N, K), s (*, NB, KB), q_t (*, K, N), all contiguous
    linear(x (M, K), weight, wq, ws, wtq, act_pow2, kernels, out_dtype)
                                     -> y (M, N), xq (M, K), xs (M, KB) with strides (1, M)
    linear_bwd(gy, xq, xs, wtq, ws, ...)                          -> dx (M, K), dW (N, K)
    grouped(x (T, K), w (E, N, K), offs, act_pow2, weight_pow2, kernels, out_dtype)
                                     -> y (T, N), xq, xs, wtq (E, K, N), ws (E, NB, KB)
    grouped_bwd(gy, xq, xs, wtq, ws, offs, ...)                   -> dx (T, K), dW (E, N, K)

`linear` and `grouped` carry their backward (`register_autograd`, which calls the `_bwd` operator):
Dgrad and Wgrad in FP8 from the saved FP8 activations (xq, xs: extra outputs, so that autograd can
keep them) and the FP8 weight (W^T and its scales). A `_bwd` operator returns a zero-size tensor
for a gradient that is not needed. `kernels` is the recipe's kernel choices as one string
(`moeco.fp8.spec.Kernels.key`): a custom operator takes only tensors and plain values.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from moeco.fp8 import compute
from moeco.fp8.format import BLOCK as _B
from moeco.fp8.format import FP8_DTYPE
from moeco.fp8.format import ceil_div as _cdiv
from moeco.fp8.quantize import quantize_weight_128x128
from moeco.fp8.spec import Kernels


@functools.lru_cache(maxsize=64)
def _kernels(key: str) -> Kernels:
    return Kernels.from_key(key)


def _outer_major_empty(rows: int, cols: int, like: Tensor) -> Tensor:
    return torch.empty_strided((rows, cols), (1, max(rows, 1)), dtype=torch.float32, device=like.device)


def _empty_unless(need: bool, shape, like: Tensor, dtype: torch.dtype) -> Tensor:
    return like.new_empty(tuple(shape) if need else (0,), dtype=dtype)


@torch.library.custom_op("moeco_fp8::quant_weight", mutates_args=())
def quant_weight(w: Tensor, pow2: bool) -> tuple[Tensor, Tensor, Tensor]:
    q, s, qt = quantize_weight_128x128(w, pow2_scale=pow2, transposed=True)
    return q.contiguous(), s.contiguous(), qt.contiguous()


@quant_weight.register_fake
def _(w, pow2):
    *lead, N, K = w.shape
    return (w.new_empty(w.shape, dtype=FP8_DTYPE), w.new_empty((*lead, _cdiv(N, _B), _cdiv(K, _B)), dtype=torch.float32),
            w.new_empty((*lead, K, N), dtype=FP8_DTYPE))


# ---- Fp8Linear ------------------------------------------------------------------------------------


@torch.library.custom_op("moeco_fp8::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, wq: Tensor, ws: Tensor, wtq: Tensor, act_pow2: bool, kernels: str,
           out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """y = x . W^T from the FP8 weight (wq, ws); `weight` (the master) is an input only so that its
    gradient has somewhere to go. Returns y and the FP8 activations saved for backward."""
    return compute.linear_forward(x, wq, ws, act_pow2, _kernels(kernels), out_dtype)


@linear.register_fake
def _(x, weight, wq, ws, wtq, act_pow2, kernels, out_dtype):
    M, K = x.shape
    return (x.new_empty((M, wq.shape[0]), dtype=out_dtype), x.new_empty((M, K), dtype=FP8_DTYPE),
            _outer_major_empty(M, _cdiv(K, _B), x))


def _linear_setup(ctx, inputs, output):
    x, weight, wq, ws, wtq, act_pow2, kernels, out_dtype = inputs
    _, xq, xs = output
    ctx.save_for_backward(xq, xs, wtq, ws)
    ctx.meta = (x.dtype, weight.dtype, act_pow2, kernels)
    ctx.mark_non_differentiable(xq, xs)


def _linear_backward(ctx, gy, *_):
    need_dx, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dx, dw = torch.ops.moeco_fp8.linear_bwd(gy.contiguous(), *ctx.saved_tensors, *ctx.meta, need_dx, need_dw)
    return (dx if need_dx else None), (dw if need_dw else None), None, None, None, None, None, None


@torch.library.custom_op("moeco_fp8::linear_bwd", mutates_args=())
def linear_bwd(gy: Tensor, xq: Tensor, xs: Tensor, wtq: Tensor, ws: Tensor, x_dtype: torch.dtype,
               w_dtype: torch.dtype, act_pow2: bool, kernels: str, need_dx: bool,
               need_dw: bool) -> tuple[Tensor, Tensor]:
    dx, dw = compute.linear_backward(gy, xq, xs, wtq, ws, x_dtype, w_dtype, act_pow2, _kernels(kernels), need_dx,
                                     need_dw)
    return (dx if dx is not None else _empty_unless(False, (), gy, x_dtype),
            dw if dw is not None else _empty_unless(False, (), gy, w_dtype))


@linear_bwd.register_fake
def _(gy, xq, xs, wtq, ws, x_dtype, w_dtype, act_pow2, kernels, need_dx, need_dw):
    return (_empty_unless(need_dx, xq.shape, gy, x_dtype),
            _empty_unless(need_dw, (wtq.shape[1], wtq.shape[0]), gy, w_dtype))


linear.register_autograd(_linear_backward, setup_context=_linear_setup)


# ---- routed experts: the grouped GEMM ------------------------------------------------------------


@torch.library.custom_op("moeco_fp8::grouped", mutates_args=())
def grouped(x: Tensor, w: Tensor, offs: Tensor, act_pow2: bool, weight_pow2: bool, kernels: str,
            out_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """y[rows of e] = x[rows of e] . W_e^T; returns y, the FP8 activations and W^T with its scales."""
    with torch.no_grad():  # (E, N, K), (E, NB, KB), and W_e^T (E, K, N) for Dgrad, one kernel on CUDA
        wq, ws, wtq = quantize_weight_128x128(w.detach(), pow2_scale=weight_pow2, transposed=True)
    return compute.grouped_forward(x, wq, ws, wtq, offs, act_pow2, _kernels(kernels), out_dtype)


@grouped.register_fake
def _(x, w, offs, act_pow2, weight_pow2, kernels, out_dtype):
    T, K = x.shape
    E, N, _ = w.shape
    return (x.new_empty((T, N), dtype=out_dtype), x.new_empty((T, K), dtype=FP8_DTYPE),
            _outer_major_empty(T, _cdiv(K, _B), x), x.new_empty((E, K, N), dtype=FP8_DTYPE),
            x.new_empty((E, _cdiv(N, _B), _cdiv(K, _B)), dtype=torch.float32))


def _grouped_setup(ctx, inputs, output):
    x, w, offs, act_pow2, weight_pow2, kernels, out_dtype = inputs
    _, xq, xs, wtq, ws = output
    ctx.save_for_backward(xq, xs, wtq, ws, offs)
    ctx.meta = (x.dtype, w.dtype, tuple(w.shape), act_pow2, kernels)
    ctx.mark_non_differentiable(xq, xs, wtq, ws)


def _grouped_backward(ctx, gy, *_):
    xq, xs, wtq, ws, offs = ctx.saved_tensors
    x_dtype, w_dtype, w_shape, act_pow2, kernels = ctx.meta
    dx, dw = torch.ops.moeco_fp8.grouped_bwd(gy.contiguous(), xq, xs, wtq, ws, offs, list(w_shape), act_pow2,
                                             kernels, x_dtype, w_dtype, ctx.needs_input_grad[0],
                                             ctx.needs_input_grad[1])
    return (dx if ctx.needs_input_grad[0] else None), (dw if ctx.needs_input_grad[1] else None), \
        None, None, None, None, None


@torch.library.custom_op("moeco_fp8::grouped_bwd", mutates_args=())
def grouped_bwd(gy: Tensor, xq: Tensor, xs: Tensor, wtq: Tensor, ws: Tensor, offs: Tensor, w_shape: list[int],
                act_pow2: bool, kernels: str, x_dtype: torch.dtype, w_dtype: torch.dtype, need_dx: bool,
                need_dw: bool) -> tuple[Tensor, Tensor]:
    """(dx (T, K), dW (E, N, K)) of the grouped GEMM; a zero-size tensor for one not asked for."""
    dx, dw = compute.grouped_backward(gy, xq, xs, wtq, ws, offs, tuple(w_shape), act_pow2, _kernels(kernels),
                                      x_dtype, w_dtype, need_dx, need_dw)
    return (dx if dx is not None else _empty_unless(False, (), gy, x_dtype),
            dw if dw is not None else _empty_unless(False, (), gy, w_dtype))


@grouped_bwd.register_fake
def _(gy, xq, xs, wtq, ws, offs, w_shape, act_pow2, kernels, x_dtype, w_dtype, need_dx, need_dw):
    return _empty_unless(need_dx, xq.shape, gy, x_dtype), _empty_unless(need_dw, w_shape, gy, w_dtype)


grouped.register_autograd(_grouped_backward, setup_context=_grouped_setup)
