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
such as fused AdamW update weights in place without bumping `_version`, except inside
`weight_cache()`: there each weight (Linear or grouped experts) is quantized at its first forward
and reused until the block ends. The trainer opens one around the micro-steps of an optimizer step
(`train.fp8_weight_cache`), so with gradient accumulation the weights are quantized once per
optimizer step, not once per micro-step.

`fp8_grouped_mm` is the same three GEMMs for routed experts: tokens sorted by expert, `offs` the
cumulative end row of each expert (torch._grouped_mm's convention). Activations and gradients are
quantized once for all tokens (their tiles are per token), the (E, N, K) weights per expert block.
On CUDA with Triton, Fprop, Dgrad and Wgrad are each one grouped kernel launch for all experts
(`triton_kernels.fp8_grouped_gemm_nt`, `fp8_grouped_wgrad`; no host sync); elsewhere, or with
MOECO_FP8_GROUPED=loop, one FP8 GEMM per expert (`grouped_impl` says which).

Eager calls run through the autograd.Functions here; under torch.compile the same helpers run as
custom operators (`moeco.fp8.ops`), so compiled blocks keep the FP8 layers without a graph break.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from moeco.fp8.gemm import fp8_gemm
from moeco.fp8.ops import _outer_major  # importing ops registers torch.ops.moeco_fp8
from moeco.fp8.quantize import (
    dequantize_weight_128x128,
    quantize_act_1x128,
    quantize_act_1x128_dual,
    quantize_act_1x128_t,
    quantize_weight_128x128,
)


class _StepCache:
    """State of `weight_cache()`: nesting depth, a generation that changes whenever the outermost
    block opens or closes (so a key taken in one block never matches in another), and the grouped
    weights quantized in this block, by (data_ptr, shape, dtype, pow2)."""

    depth = 0
    generation = 0
    grouped: dict = {}


@contextlib.contextmanager
def weight_cache():
    """Quantize each FP8 weight once inside this block (at its first forward) and reuse it.

    For the forwards of one optimizer step: the master weights must not change inside the block
    (the optimizer steps after it closes). Eager only; compiled code quantizes every call. Holds
    W and W^T in FP8 (2 bytes per parameter) until the block closes.
    """
    if _StepCache.depth == 0:
        _StepCache.generation += 1
    _StepCache.depth += 1
    try:
        yield
    finally:
        _StepCache.depth -= 1
        if _StepCache.depth == 0:
            _StepCache.generation += 1
            _StepCache.grouped.clear()


def _grouped_weight(w: torch.Tensor, weight_pow2: bool, step_cache: bool):
    """(wq (E, N, K), ws (E, NB, KB), W^T q (E, K, N)); with `step_cache`, from `weight_cache()` when
    one is open."""
    # Only parameters (leaves that take gradients) are cached: a temporary's memory, and so its
    # data_ptr, can belong to another tensor later in the same block.
    cache = step_cache and _StepCache.depth > 0 and w.is_leaf and w.requires_grad
    key = (w.data_ptr(), tuple(w.shape), w.dtype, weight_pow2)
    if cache and key in _StepCache.grouped:
        return _StepCache.grouped[key]
    with torch.no_grad():  # (E, N, K), (E, NB, KB), and W_e^T (E, K, N) for Dgrad, one kernel on CUDA
        out = quantize_weight_128x128(w.detach(), pow2_scale=weight_pow2, transposed=True)
    if cache:
        _StepCache.grouped[key] = out
    return out


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    # Under autocast the GEMM writes the autocast dtype, as nn.Linear would; otherwise x's dtype.
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _linear_forward(x2, wq, ws, act_pow2: bool, backend: str, out_dtype: torch.dtype):
    """Fprop: (y = x . W^T, xq, xs) for x (M, K) and the FP8 weight (wq (N, K), ws (NB, KB))."""
    xq, xs = quantize_act_1x128(x2, pow2_scale=act_pow2)
    y = fp8_gemm(xq, xs, wq, ws, out_dtype, backend=backend)
    return y.contiguous(), xq.contiguous(), _outer_major(xs)


def _linear_backward_impl(gy, xq, xs, wtq, ws, x_dtype, w_dtype, act_pow2: bool, backend: str, need_dx: bool,
                          need_dw: bool):
    """(dx, dW) of `_linear_forward` (None for one not asked for), from the saved FP8 tensors."""
    gy = gy.contiguous()
    dx = dw = None
    if need_dx and need_dw:  # dy's two tilings from one read of it (one kernel on CUDA)
        (gq, gs), (gtq, gts) = quantize_act_1x128_dual(gy, pow2_scale=act_pow2)
    elif need_dx:
        gq, gs = quantize_act_1x128(gy, pow2_scale=act_pow2)
    elif need_dw:
        gtq, gts = quantize_act_1x128_t(gy, pow2_scale=act_pow2)
    if need_dx:  # Dgrad: dy (1x128 along N) . W  ==  dy . (W^T)^T
        dx = fp8_gemm(gq, gs, wtq, ws.t().contiguous(), x_dtype, backend=backend)
    if need_dw:  # Wgrad: dy^T . x, both operands 1x128 along the tokens
        xtq, xts = quantize_act_1x128_t(xq, xs, pow2_scale=act_pow2)
        dw = fp8_gemm(gtq, gts, xtq, xts, torch.float32, backend=backend).to(w_dtype)
    return dx, dw


class _Fp8LinearFn(torch.autograd.Function):
    """The eager path of Fp8Linear (cheaper to call than the custom operator, which compiled code uses)."""

    @staticmethod
    def forward(ctx, x2, weight, wq, ws, wtq, act_pow2: bool, backend: str, out_dtype: torch.dtype):
        y, xq, xs = _linear_forward(x2, wq, ws, act_pow2, backend, out_dtype)
        ctx.save_for_backward(xq, xs, wtq, ws)
        ctx.meta = (x2.dtype, weight.dtype, act_pow2, backend)
        return y

    @staticmethod
    def backward(ctx, gy):
        dx, dw = _linear_backward_impl(gy, *ctx.saved_tensors, *ctx.meta, ctx.needs_input_grad[0],
                                       ctx.needs_input_grad[1])
        return dx, dw, None, None, None, None, None, None


class Fp8Linear(nn.Linear):
    """nn.Linear with FP8 Fprop/Dgrad/Wgrad; see the module docstring. `recipe`: an Fp8Recipe."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, recipe=None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        if recipe is None:
            from moeco.fp8.recipe import Fp8Recipe

            recipe = Fp8Recipe()
        self.recipe = recipe
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
            key = ("step", _StepCache.generation, w.data_ptr(), w.dtype) if _StepCache.depth else None
        else:
            key = (w.data_ptr(), w._version, w.device, w.dtype)
        if key is None or self._wcache is None or self._wcache[0] != key:
            with torch.no_grad():  # W and W^T (the Dgrad operand), one kernel on CUDA
                wq, ws, wtq = quantize_weight_128x128(w, pow2_scale=self.recipe.weight_pow2, transposed=True)
            self._wcache = (key, wq, ws, wtq)
        return self._wcache[1], self._wcache[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = x.shape[-1]
        args = (self.recipe.act_pow2, self.recipe.backend, _out_dtype(x))
        if torch.compiler.is_compiling():  # one opaque custom operator (the weight cache reads data_ptr)
            wq, ws, wtq = torch.ops.moeco_fp8.quant_weight(self.weight.detach(), self.recipe.weight_pow2)
            y, _, _ = torch.ops.moeco_fp8.linear(x.reshape(-1, K), self.weight, wq, ws, wtq, *args)
        else:
            self.quantized_weight()
            wq, ws, wtq = self._wcache[1:]
            y = _Fp8LinearFn.apply(x.reshape(-1, K), self.weight, wq, ws, wtq, *args)
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8={self.recipe.name}"


def _rows(offs: torch.Tensor) -> list[tuple[int, int]]:
    ends = [int(v) for v in offs.tolist()]
    return list(zip([0] + ends[:-1], ends))


GROUPED_MODES = ("auto", "triton", "loop", "fbgemm")


def grouped_impl(device: torch.device, backend: str, *, wgrad: bool = False) -> str:
    """"fbgemm" (FBGEMM's CUTLASS grouped kernel, `moeco.fp8.fbgemm`), "triton" (moeco's grouped
    kernel for all experts) or "loop" (one FP8 GEMM per expert).

    Environment: MOECO_FP8_GROUPED=auto|triton|loop|fbgemm (Fprop and Dgrad, and Wgrad unless
    MOECO_FP8_GROUPED_WGRAD says otherwise; the Wgrad has no FBGEMM form and takes "triton" for
    "fbgemm"; its "triton" form quantizes with moeco's kernels and runs the GEMM as moeco's Hopper
    kernel where it applies, `triton_kernels.grouped_wgrad_gemm`). "auto" takes FBGEMM's kernel on Hopper
    when `fbgemm-gpu-genai` is importable, else moeco's grouped kernels on CUDA, and the loop on CPU;
    "triton" forces moeco's kernels (CPU needs TRITON_INTERPRET=1); "fbgemm" requires FBGEMM; "loop" forces
    the loop. "fbgemm" calls whose shapes it cannot take (N or K not a multiple of 128, output not bf16) run
    moeco's kernel.
    """
    mode = os.environ.get("MOECO_FP8_GROUPED", "auto") or "auto"
    if wgrad:
        mode = os.environ.get("MOECO_FP8_GROUPED_WGRAD", mode) or mode
    if mode not in GROUPED_MODES:
        raise ValueError(f"MOECO_FP8_GROUPED{'_WGRAD' if wgrad else ''}={mode!r}; valid: {', '.join(GROUPED_MODES)}")
    if mode == "loop":
        return "loop"
    from moeco.fp8 import fbgemm, triton_kernels

    ok = triton_kernels.available(device)
    if mode == "fbgemm" and not fbgemm.available(device):
        raise RuntimeError(f"MOECO_FP8_GROUPED=fbgemm but FBGEMM's grouped FP8 kernel cannot run on {device} "
                           "(pip install fbgemm-gpu-genai, the build for this torch; Hopper GPU)")
    if mode in ("triton", "fbgemm"):
        if not ok:
            raise RuntimeError(f"MOECO_FP8_GROUPED={mode} but Triton cannot run on {device} "
                               "(not installed, or CPU without TRITON_INTERPRET=1)")
        return "triton" if wgrad or mode == "triton" else "fbgemm"
    # "auto": the grouped kernels on a GPU (checked against the loop on the H200 by
    # tests/test_fp8_gpu.py; the `small` FP8 step ran 3.7x faster than with the loop); the loop on
    # CPU, where the Triton interpreter would be far slower.
    # An explicit per-GEMM backend ("reference", "scaled_mm") keeps the loop, which honours it.
    if not (ok and device.type == "cuda" and backend in ("auto", "triton")):
        return "loop"
    return "fbgemm" if not wgrad and backend == "auto" and fbgemm.available(device) else "triton"


def _grouped_gemm(impl: str, a_q, a_scale, b_q, b_scale_nk, offs_d, out_dtype, b_scale_kn=None):
    """One grouped GEMM on the device for impl "fbgemm" or "triton": out[rows of e] = a . b[e]^T, with
    b's 128x128 scales (E, NB, KB) as `b_scale_nk` or, transposed and contiguous, `b_scale_kn`."""
    from moeco.fp8 import fbgemm, triton_kernels

    if impl == "fbgemm" and fbgemm.fits(b_q.shape[1], b_q.shape[2], out_dtype):
        kn = b_scale_kn if b_scale_kn is not None else b_scale_nk.transpose(1, 2).contiguous()
        return fbgemm.grouped_gemm(a_q, a_scale, b_q, kn, offs_d)
    nk = b_scale_nk if b_scale_nk is not None else b_scale_kn.transpose(1, 2)
    return triton_kernels.fp8_grouped_gemm_nt(a_q, a_scale, b_q, nk, offs_d, out_dtype)


def fp8_grouped_gemm_loop(xq, xs, wq, ws, rows: list[tuple[int, int]], out_dtype: torch.dtype,
                          backend: str = "auto") -> torch.Tensor:
    """y[r0:r1] = x_e . W_e^T for pre-quantized operands, one FP8 GEMM per expert with tokens."""
    y = torch.zeros((xq.shape[0], wq.shape[1]), dtype=out_dtype, device=xq.device)
    for e, (r0, r1) in enumerate(rows):
        if r1 > r0:
            y[r0:r1] = fp8_gemm(xq[r0:r1], xs[r0:r1], wq[e], ws[e], out_dtype, backend=backend)
    return y


def _grouped_forward(x, w, offs, act_pow2: bool, weight_pow2: bool, backend: str, out_dtype: torch.dtype,
                     step_cache: bool = False, x_fp8=None):
    """The grouped Fprop: (y, xq, xs, W^T q (E, K, N), W scales (E, NB, KB)); see `ops.grouped`.
    `step_cache`: take the FP8 weight from `weight_cache()` (eager calls; not the custom operator).
    `x_fp8`: x already quantized 1x128, (xq, xs) (an FP8 dispatch payload), used as it is."""
    xq, xs = x_fp8 if x_fp8 is not None else quantize_act_1x128(x, pow2_scale=act_pow2)
    wq, ws, wtq = _grouped_weight(w, weight_pow2, step_cache)
    impl = grouped_impl(x.device, backend)
    if impl != "loop":
        y = _grouped_gemm(impl, xq, xs, wq, ws, offs.to(device=x.device, dtype=torch.int32), out_dtype)
    else:
        y = fp8_grouped_gemm_loop(xq, xs, wq, ws, _rows(offs), out_dtype, backend)
    return y.contiguous(), xq.contiguous(), _outer_major(xs), wtq.contiguous(), ws.contiguous()


def _grouped_backward_impl(gy, xq, xs, wtq, ws, offs, w_shape, act_pow2: bool, backend: str, x_dtype, w_dtype,
                           need_dx: bool, need_dw: bool):
    """(dx, dW) of the grouped GEMM (None for one not asked for); see `ops.grouped_bwd`."""
    E = w_shape[0]
    dx = dw = None
    impl = grouped_impl(gy.device, backend)
    impl_w = grouped_impl(gy.device, backend, wgrad=True)
    rows = None
    if impl != "loop" or impl_w != "loop":
        from moeco.fp8 import triton_kernels

        offs_d = offs.to(device=gy.device, dtype=torch.int32)
    if need_dx:
        gq, gs = quantize_act_1x128(gy, pow2_scale=act_pow2)
        if impl != "loop":  # Dgrad: dy (1x128 along N) . W_e, i.e. W_e^T (K, N), whose (KB, NB) block
            # scales are ws transposed: ws itself is their reduction-first form
            dx = _grouped_gemm(impl, gq, gs, wtq, None, offs_d, x_dtype, b_scale_kn=ws)
        else:
            rows = _rows(offs)
            dx = torch.zeros(xq.shape, dtype=x_dtype, device=gy.device)
            for e, (r0, r1) in enumerate(rows):
                if r1 > r0:
                    dx[r0:r1] = fp8_gemm(gq[r0:r1], gs[r0:r1], wtq[e], ws[e].t().contiguous(), x_dtype,
                                         backend=backend)
    if need_dw:
        if impl_w == "triton":  # Wgrad: dy_e^T . x_e, both 128x1-tiled along each expert's tokens
            dw = triton_kernels.fp8_grouped_wgrad(gy, xq, xs, offs_d, E, pow2_scale=act_pow2).to(w_dtype)
        else:
            rows = rows if rows is not None else _rows(offs)
            dw = torch.zeros(w_shape, dtype=w_dtype, device=gy.device)
            for e, (r0, r1) in enumerate(rows):
                if r1 > r0:
                    gtq, gts = quantize_act_1x128_t(gy[r0:r1], pow2_scale=act_pow2)
                    xtq, xts = quantize_act_1x128_t(xq[r0:r1], xs[r0:r1], pow2_scale=act_pow2)
                    dw[e] = fp8_gemm(gtq, gts, xtq, xts, torch.float32, backend=backend).to(w_dtype)
    return dx, dw


class _Fp8GroupedFn(torch.autograd.Function):
    """The eager path of fp8_grouped_mm (the custom operator `moeco_fp8::grouped` is the compiled one)."""

    @staticmethod
    def forward(ctx, x, w, offs, act_pow2: bool, weight_pow2: bool, backend: str, out_dtype: torch.dtype,
                x_fp8=None):
        y, xq, xs, wtq, ws = _grouped_forward(x, w, offs, act_pow2, weight_pow2, backend, out_dtype, True, x_fp8)
        ctx.save_for_backward(xq, xs, wtq, ws, offs)
        ctx.meta = (tuple(w.shape), act_pow2, backend, x.dtype, w.dtype)
        return y

    @staticmethod
    def backward(ctx, gy):
        w_shape, act_pow2, backend, x_dtype, w_dtype = ctx.meta
        dx, dw = _grouped_backward_impl(gy.contiguous(), *ctx.saved_tensors, w_shape, act_pow2, backend, x_dtype,
                                        w_dtype, ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return dx, dw, None, None, None, None, None, None


# Under torch.compile (`train.compile`) the FP8 GEMMs run as custom operators (`moeco.fp8.ops`): each
# is one opaque node, so a compiled block keeps them in its graph without a break, and Inductor never
# tries to lower block-scaled `_scaled_mm` (torch 2.11 cannot: "Inductor Triton does not support
# scale_a.shape = ...", seen on the H200). Eager calls take the autograd.Functions above, which run the
# same helpers with less dispatch cost (a custom operator call costs ~20 us more on the host).
def fp8_grouped_mm(x_TK: torch.Tensor, w_ENK: torch.Tensor, offs: torch.Tensor, *, recipe=None,
                   x_fp8: tuple | None = None) -> torch.Tensor:
    """y[rows of e] = x[rows of e] . w[e]^T in FP8; offs (E,) int cumulative end rows; y (T, N).

    x_fp8: (xq, xs), x already quantized 1x128 (an FP8 dispatch payload): the GEMM takes it as it is,
    and x only carries the gradient (dx is computed from dy and W, as without it)."""
    if recipe is None:
        from moeco.fp8.recipe import Fp8Recipe

        recipe = Fp8Recipe()
    args = (recipe.act_pow2, recipe.weight_pow2, recipe.backend, _out_dtype(x_TK))
    if torch.compiler.is_compiling() and x_fp8 is None:
        return torch.ops.moeco_fp8.grouped(x_TK, w_ENK, offs, *args)[0]
    return _Fp8GroupedFn.apply(x_TK, w_ENK, offs, *args, x_fp8)


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
