"""FBGEMM's CUTLASS grouped FP8 GEMM for the routed experts' Fprop and Dgrad (optional dependency).

FBGEMM's gen-AI kernels (`pip install fbgemm-gpu-genai`, built against one torch version: 1.6.0 for
torch 2.11) include `f8f8bf16_groupwise_grouped`, a Hopper grouped GEMM with DeepSeek-V3's scaling:
1x128 activation tiles, 128x128 weight blocks, FP32 promotion per 128 of K, bf16 output. On the
H200 it ran the experts' Fprop at 1.22x / 1.28x BF16 `_grouped_mm` against moeco's Triton kernel's
1.08x / 1.12x (32 experts x 512 tokens, BENCHMARKS.md), with the same bf16 output bit for bit.
When it is importable, on Hopper, for bf16 outputs and N, K multiples of 128, `fp8_grouped_mm` takes
it (the recipe's grouped_kernel "auto" or "fbgemm"); the Wgrad stays moeco's (FBGEMM has no grouped
GEMM that reduces over each expert's tokens with 128x1 scales).

What it wants, from its source and probed on the H200:
    a (T, K) E4M3, rows sorted by expert           M_sizes (E,) int64 rows per expert
    a_scale: expert e's scales as its own (KB, M_e) block, M_e contiguous, at offset KB * start_e
             (moeco's quantizer writes one (KB, T) buffer: `triton_kernels.group_scales` moves them)
    b (E, N, K) E4M3                               b_scale (E, KB, NB): the reduction's blocks first
Rows past sum(M_sizes) are not written by it; moeco zeroes them (its grouped contract).
"""

from __future__ import annotations

import torch

from moeco.fp8 import triton_kernels
from moeco.fp8.format import BLOCK

_STATE: dict = {}


def available(device: torch.device) -> bool:
    """Whether FBGEMM's grouped groupwise kernel loads here (CUDA, compute capability 9.x)."""
    if device.type != "cuda":
        return False
    key = str(device)
    if key not in _STATE:
        ok = False
        try:
            import fbgemm_gpu.experimental.gen_ai  # noqa: F401  (registers torch.ops.fbgemm.*)

            ok = (hasattr(torch.ops.fbgemm, "f8f8bf16_groupwise_grouped")
                  and torch.cuda.get_device_capability(device)[0] == 9)
        except Exception:  # not installed, or built for another torch: moeco's kernels run instead
            ok = False
        _STATE[key] = ok
    return _STATE[key]


def fits(N: int, K: int, out_dtype: torch.dtype) -> bool:
    return N % BLOCK == 0 and K % BLOCK == 0 and N > 0 and K > 0 and out_dtype == torch.bfloat16


def group_scales_reference(a_scale: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """(T, KB) 1x128 scales -> a flat (T * KB,) buffer with expert e's scales as a (KB, M_e) block at
    offset KB * start_e, M_e contiguous; rows past offs[-1] form one more block after the last. Device
    ops only (no host sync); `triton_kernels.group_scales` does it in one launch."""
    T, KB = a_scale.shape
    dev = a_scale.device
    ends = torch.cat([offs.to(device=dev, dtype=torch.int64), torch.full((1,), T, dtype=torch.int64, device=dev)])
    sizes = torch.diff(ends, prepend=ends.new_zeros(1))
    starts = ends - sizes
    t = torch.arange(T, dtype=torch.int64, device=dev)
    e = torch.searchsorted(ends, t, right=True)  # the block of row t (T itself is past every row)
    start, size = starts[e], sizes[e]
    dest = (KB * start + (t - start))[:, None] + torch.arange(KB, device=dev)[None, :] * size[:, None]
    out = torch.empty(T * KB, dtype=torch.float32, device=dev)
    out[dest.reshape(-1)] = a_scale.reshape(-1).float()
    return out


def grouped_gemm(a_q, a_scale, b_q, b_scale_kn, offs):
    """out[rows of e] = a[rows of e] . b[e]^T (bf16), rows past offs[-1] zero; b_scale_kn (E, KB, NB)."""
    xs, sizes = triton_kernels.group_scales(a_scale, offs)
    out = torch.ops.fbgemm.f8f8bf16_groupwise_grouped(a_q.contiguous(), b_q.contiguous(), xs,
                                                     b_scale_kn.contiguous(), sizes)
    return triton_kernels.zero_rows_past(out, offs)  # a no-op for empty shapes


__all__ = ["available", "fits", "group_scales_reference", "grouped_gemm"]
