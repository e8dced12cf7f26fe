"""The FP8 Linear's and the routed experts' GEMMs, forward and backward, as plain functions.

Both ways of calling them run these: the eager autograd.Functions of `moeco.fp8.linear` and the
custom operators of `moeco.fp8.ops` (what torch.compile sees), so compiled and eager results agree.
The weights come in quantized (W (N, K) or (E, N, K) as E4M3 with 128x128 block scales, and W^T for
Dgrad); `kernels` is the recipe's kernel choices (`moeco.fp8.spec.Kernels`).

    linear_forward    y = x . W^T                  x quantized 1x128 here; returns its FP8 copy too
    linear_backward   dx = dy . W, dW = dy^T . x   from the saved FP8 x and W^T
    grouped_forward   y[rows of e] = x[rows of e] . W_e^T, tokens sorted by expert (offs: cumulative ends)
    grouped_backward  dx and dW_e for all experts: one grouped kernel each on CUDA, or a loop per expert
"""

from __future__ import annotations

import torch

from moeco.fp8 import fbgemm, triton_kernels
from moeco.fp8.gemm import fp8_gemm
from moeco.fp8.grouped_wgrad import fp8_grouped_wgrad
from moeco.fp8.quantize import quantize_act_1x128, quantize_act_1x128_dual, quantize_act_1x128_t
from moeco.fp8.spec import GROUPED_KERNELS, Kernels


def outer_major(s: torch.Tensor) -> torch.Tensor:
    """s (R, C) laid out with strides (1, R), the layout the CUDA kernels write and `_scaled_mm` takes."""
    if s.stride() == (1, s.shape[0]) or s.numel() == 0:
        return s
    return s.t().contiguous().t()


def _gemm_args(kernels: Kernels) -> dict:
    return dict(backend=kernels.backend, gemm_kernel=kernels.gemm, tma=kernels.tma)


def linear_forward(x2, wq, ws, act_pow2: bool, kernels: Kernels, out_dtype: torch.dtype):
    """Fprop: (y = x . W^T, xq, xs) for x (M, K) and the FP8 weight (wq (N, K), ws (NB, KB))."""
    xq, xs = quantize_act_1x128(x2, pow2_scale=act_pow2)
    y = fp8_gemm(xq, xs, wq, ws, out_dtype, **_gemm_args(kernels))
    return y.contiguous(), xq.contiguous(), outer_major(xs)


def linear_backward(gy, xq, xs, wtq, ws, x_dtype, w_dtype, act_pow2: bool, kernels: Kernels, need_dx: bool,
                    need_dw: bool):
    """(dx, dW) of `linear_forward` (None for one not asked for), from the saved FP8 tensors."""
    gy = gy.contiguous()
    dx = dw = None
    quant = kernels.quant
    if need_dx and need_dw:  # dy's two tilings from one read of it (one kernel on CUDA)
        (gq, gs), (gtq, gts) = quantize_act_1x128_dual(gy, pow2_scale=act_pow2, quant_kernel=quant)
    elif need_dx:
        gq, gs = quantize_act_1x128(gy, pow2_scale=act_pow2)
    elif need_dw:
        gtq, gts = quantize_act_1x128_t(gy, pow2_scale=act_pow2, quant_kernel=quant)
    if need_dx:  # Dgrad: dy (1x128 along N) . W  ==  dy . (W^T)^T
        dx = fp8_gemm(gq, gs, wtq, ws.t().contiguous(), x_dtype, **_gemm_args(kernels))
    if need_dw:  # Wgrad: dy^T . x, both operands 1x128 along the tokens
        xtq, xts = quantize_act_1x128_t(xq, xs, pow2_scale=act_pow2, quant_kernel=quant)
        dw = fp8_gemm(gtq, gts, xtq, xts, torch.float32, **_gemm_args(kernels)).to(w_dtype)
    return dx, dw


def expert_rows(offs: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) rows of each expert from the cumulative ends `offs` (reads them on the host)."""
    ends = [int(v) for v in offs.tolist()]
    return list(zip([0] + ends[:-1], ends))


def grouped_impl(device: torch.device, backend: str, mode: str = "auto", *, wgrad: bool = False) -> str:
    """"fbgemm" (FBGEMM's CUTLASS grouped kernel, `moeco.fp8.fbgemm`), "triton" (moeco's grouped
    kernel for all experts) or "loop" (one FP8 GEMM per expert), for the recipe's grouped_kernel
    (`mode`; its grouped_wgrad_kernel with `wgrad`).

    The Wgrad has no FBGEMM form and takes "triton" for "fbgemm"; its "triton" form quantizes with
    moeco's kernels and runs the GEMM as moeco's Hopper kernel where it applies
    (`triton_kernels.grouped_wgrad_gemm`). "auto" takes FBGEMM's kernel on Hopper when
    `fbgemm-gpu-genai` is importable, else moeco's grouped kernels on CUDA, and the loop on CPU;
    "triton" forces moeco's kernels (CPU needs TRITON_INTERPRET=1); "fbgemm" requires FBGEMM; "loop"
    forces the loop. "fbgemm" calls whose shapes it cannot take (N or K not a multiple of 128, output not
    bf16) run moeco's kernel.
    """
    field = "grouped_wgrad_kernel" if wgrad else "grouped_kernel"
    if mode not in GROUPED_KERNELS:
        raise ValueError(f"{field}={mode!r}; valid: {', '.join(GROUPED_KERNELS)}")
    if mode == "loop":
        return "loop"
    ok = triton_kernels.available(device)
    if mode == "fbgemm" and not fbgemm.available(device):
        raise RuntimeError(f"{field}='fbgemm' but FBGEMM's grouped FP8 kernel cannot run on {device} "
                           "(pip install fbgemm-gpu-genai, the build for this torch; Hopper GPU)")
    if mode in ("triton", "fbgemm"):
        if not ok:
            raise RuntimeError(f"{field}={mode!r} but Triton cannot run on {device} "
                               "(not installed, or CPU without TRITON_INTERPRET=1)")
        return "triton" if wgrad or mode == "triton" else "fbgemm"
    # "auto": the grouped kernels on a GPU (checked against the loop on the H200 by
    # tests/test_fp8_gpu.py; the `small` FP8 step ran 3.7x faster than with the loop); the loop on
    # CPU, where the Triton interpreter would be far slower.
    # An explicit per-GEMM backend ("reference", "scaled_mm") keeps the loop, which honours it.
    if not (ok and device.type == "cuda" and backend in ("auto", "triton")):
        return "loop"
    return "fbgemm" if not wgrad and backend == "auto" and fbgemm.available(device) else "triton"


def _grouped_gemm(impl: str, a_q, a_scale, b_q, b_scale_nk, offs_d, out_dtype, tma: bool, b_scale_kn=None):
    """One grouped GEMM on the device for impl "fbgemm" or "triton": out[rows of e] = a . b[e]^T, with
    b's 128x128 scales (E, NB, KB) as `b_scale_nk` or, transposed and contiguous, `b_scale_kn`."""
    if impl == "fbgemm" and fbgemm.fits(b_q.shape[1], b_q.shape[2], out_dtype):
        kn = b_scale_kn if b_scale_kn is not None else b_scale_nk.transpose(1, 2).contiguous()
        return fbgemm.grouped_gemm(a_q, a_scale, b_q, kn, offs_d)
    nk = b_scale_nk if b_scale_nk is not None else b_scale_kn.transpose(1, 2)
    return triton_kernels.fp8_grouped_gemm_nt(a_q, a_scale, b_q, nk, offs_d, out_dtype, tma=None if tma else False)


def fp8_grouped_gemm_loop(xq, xs, wq, ws, rows: list[tuple[int, int]], out_dtype: torch.dtype,
                          backend: str = "auto", *, gemm_kernel: str = "auto", tma: bool = True) -> torch.Tensor:
    """y[r0:r1] = x_e . W_e^T for pre-quantized operands, one FP8 GEMM per expert with tokens."""
    y = torch.zeros((xq.shape[0], wq.shape[1]), dtype=out_dtype, device=xq.device)
    for e, (r0, r1) in enumerate(rows):
        if r1 > r0:
            y[r0:r1] = fp8_gemm(xq[r0:r1], xs[r0:r1], wq[e], ws[e], out_dtype, backend=backend,
                                gemm_kernel=gemm_kernel, tma=tma)
    return y


def grouped_forward(x, wq, ws, wtq, offs, act_pow2: bool, kernels: Kernels, out_dtype: torch.dtype, x_fp8=None):
    """The grouped Fprop from the quantized weight (wq (E, N, K), ws (E, NB, KB), W^T q (E, K, N)):
    (y, xq, xs, W^T q, W scales), all contiguous but xs (outer-dim-major); see `ops.grouped`.
    x_fp8: x already quantized 1x128, (xq, xs) (an FP8 dispatch payload), used as it is."""
    xq, xs = x_fp8 if x_fp8 is not None else quantize_act_1x128(x, pow2_scale=act_pow2)
    impl = grouped_impl(x.device, kernels.backend, kernels.grouped)
    if impl != "loop":
        y = _grouped_gemm(impl, xq, xs, wq, ws, offs.to(device=x.device, dtype=torch.int32), out_dtype, kernels.tma)
    else:
        y = fp8_grouped_gemm_loop(xq, xs, wq, ws, expert_rows(offs), out_dtype, **_gemm_args(kernels))
    return y.contiguous(), xq.contiguous(), outer_major(xs), wtq.contiguous(), ws.contiguous()


def grouped_backward(gy, xq, xs, wtq, ws, offs, w_shape, act_pow2: bool, kernels: Kernels, x_dtype, w_dtype,
                     need_dx: bool, need_dw: bool):
    """(dx, dW) of the grouped GEMM (None for one not asked for); see `ops.grouped_bwd`."""
    E = w_shape[0]
    dx = dw = None
    impl = grouped_impl(gy.device, kernels.backend, kernels.grouped)
    impl_w = grouped_impl(gy.device, kernels.backend, kernels.grouped_wgrad, wgrad=True)
    rows = None
    if impl != "loop" or impl_w != "loop":
        offs_d = offs.to(device=gy.device, dtype=torch.int32)
    if need_dx:
        gq, gs = quantize_act_1x128(gy, pow2_scale=act_pow2)
        if impl != "loop":  # Dgrad: dy (1x128 along N) . W_e, i.e. W_e^T (K, N), whose (KB, NB) block
            # scales are ws transposed: ws itself is their reduction-first form
            dx = _grouped_gemm(impl, gq, gs, wtq, None, offs_d, x_dtype, kernels.tma, b_scale_kn=ws)
        else:
            rows = expert_rows(offs)
            dx = torch.zeros(xq.shape, dtype=x_dtype, device=gy.device)
            for e, (r0, r1) in enumerate(rows):
                if r1 > r0:
                    dx[r0:r1] = fp8_gemm(gq[r0:r1], gs[r0:r1], wtq[e], ws[e].t().contiguous(), x_dtype,
                                         **_gemm_args(kernels))
    if need_dw:
        if impl_w == "triton":  # Wgrad: dy_e^T . x_e, both 128x1-tiled along each expert's tokens
            dw = fp8_grouped_wgrad(gy, xq, xs, offs_d, E, pow2_scale=act_pow2, tma=None if kernels.tma else False,
                                   gemm="triton" if kernels.gemm == "cublas" else "wgmma",
                                   quant_kernel=kernels.quant).to(w_dtype)
        else:
            rows = rows if rows is not None else expert_rows(offs)
            dw = torch.zeros(w_shape, dtype=w_dtype, device=gy.device)
            for e, (r0, r1) in enumerate(rows):
                if r1 > r0:
                    gtq, gts = quantize_act_1x128_t(gy[r0:r1], pow2_scale=act_pow2, quant_kernel=kernels.quant)
                    xtq, xts = quantize_act_1x128_t(xq[r0:r1], xs[r0:r1], pow2_scale=act_pow2,
                                                    quant_kernel=kernels.quant)
                    dw[e] = fp8_gemm(gtq, gts, xtq, xts, torch.float32, **_gemm_args(kernels)).to(w_dtype)
    return dx, dw


__all__ = ["expert_rows", "fp8_grouped_gemm_loop", "grouped_backward", "grouped_forward", "grouped_impl",
           "linear_backward", "linear_forward", "outer_major"]
