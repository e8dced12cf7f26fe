"""The routed experts' Wgrad in FP8: dW_e = dy_e^T . x_e for all experts, without a host sync.

    dy (T, N) high precision, x as its forward FP8 copy xq (T, K) with 1x128 scales xs, tokens sorted
    by expert (offs: cumulative end rows). Both operands are quantized 128x1 along the tokens (the
    1x128 -> 128x1 re-tiling of the report) into a layout where every expert's tokens start on a
    128-token boundary, so each 128-token tile belongs to one expert; one launch then sums each
    expert's tiles (`triton_kernels.grouped_wgrad_gemm`: moeco's Hopper kernel or Triton's).

The quantization goes through `quantize.quantize_act_1x128_t` (the NVRTC kernel where it applies,
else Triton's), which is why this sits above both `quantize` and `triton_kernels`.
"""

from __future__ import annotations

import torch

from moeco.fp8.quantize import quantize_act_1x128_t
from moeco.fp8.triton_kernels import grouped_padded_rows, grouped_wgrad_gemm


def fp8_grouped_wgrad(gy, xq, xs, offs, E: int, *, pow2_scale=False, out_dtype=torch.float32, block_m=128,
                      block_n=128, num_warps=8, num_stages=4, tma: bool | None = None, gemm: str = "wgmma",
                      quant_kernel: str = "auto"):
    """dW[e] (N, K) = gy[rows of e]^T . x[rows of e] for all experts: Wgrad of the grouped GEMM.

    gy (T, N) high precision; x given as its forward FP8 copy xq (T, K) with 1x128 scales xs.
    Both are quantized 128x1 along the tokens (`grouped_wgrad_operands`) into a layout where every
    expert starts on a 128-token boundary, then one launch computes all experts (`grouped_wgrad_gemm`;
    `gemm`, `tma` as there, `quant_kernel` as in `quantize_act_1x128_t`).
    """
    T, N = gy.shape
    K = xq.shape[1]
    if E == 0 or N == 0 or K == 0:
        return torch.zeros((E, N, K), dtype=out_dtype, device=gy.device)
    ops = grouped_wgrad_operands(gy, xq, xs, offs, pow2_scale=pow2_scale, quant_kernel=quant_kernel)
    return grouped_wgrad_gemm(*ops, E, out_dtype=out_dtype, block_m=block_m, block_n=block_n, num_warps=num_warps,
                              num_stages=num_stages, tma=tma, gemm=gemm)


def grouped_wgrad_operands(gy, xq, xs, offs, *, pow2_scale=False, quant_kernel: str = "auto"):
    """(gq (N, Tp), gs (N, Tp/128), xtq (K, Tp), xts (K, Tp/128), pstart (E + 1,) int64): gy and x (its FP8
    copy, dequantized first) quantized 128x1 along the tokens with each expert's tokens starting on a
    128-token boundary (zero tokens in between), so each 128-token tile belongs to one expert, exactly as
    the per-expert loop tiles them. The quantization kernel reads the rows through a row map, so the
    padded copy is never written. No host sync."""
    T = gy.shape[0]
    dest, pstart, Tp = grouped_padded_rows(offs, T)
    # padded row -> source row (-1: padding). Rows past offs[-1] all land on row Tp - 1, in a spare
    # block the GEMM never reads.
    src = torch.full((Tp,), -1, dtype=torch.int32, device=gy.device)
    src.scatter_(0, dest, torch.arange(T, dtype=torch.int32, device=gy.device))
    # through the dispatcher: the NVRTC token-wise kernel where it applies, else Triton's
    gq, gs = quantize_act_1x128_t(gy, pow2_scale=pow2_scale, rows=src, quant_kernel=quant_kernel)  # (N, Tp)
    xtq, xts = quantize_act_1x128_t(xq, xs, pow2_scale=pow2_scale, rows=src, quant_kernel=quant_kernel)  # (K, Tp)
    return gq, gs, xtq, xts, pstart


__all__ = ["fp8_grouped_wgrad", "grouped_wgrad_operands"]
