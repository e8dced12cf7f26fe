"""FP8 GEMM backends behind one function, `fp8_gemm`, with DeepSeek-V3's promotion.

    C (M, N) = A (M, K) . B (N, K)^T            ("NT": both operands K-major, as nn.Linear stores W)
    A: E4M3, one scale per 1x128 tile           a_scale (M, KB),  KB = ceil(K / 128)
    B: E4M3, one scale per 128x128 block        b_scale (ceil(N / 128), KB)
       or per 1x128 tile (Wgrad)                b_scale (N, KB)

    C = sum over k-blocks kb of  (A_kb . B_kb^T) * a_scale[:, kb] * b_scale[n-block, kb]

Each partial product A_kb . B_kb^T covers 128 of K (N_C = 128 = 4 WGMMAs on Hopper) and is
multiplied by its scales and added to an FP32 accumulator: the "promotion" of section 3.3 of the
DeepSeek-V3 report, which both makes fine-grained scales possible and repairs the Tensor Cores'
limited accumulation precision.

Backends:
    "reference"  CPU or any device: the formula above, one float32 matmul per k-block. FP8 values
                 are exact in float32 and so are their products, so only the float32 sums round.
    "scaled_mm"  torch._scaled_mm with block-wise scales (cuBLAS, Hopper). Shapes it cannot take
                 are zero-padded (N=576 -> 640: 11% more work); a 128x128 B whose k-block count is
                 not a multiple of 4 (the scale's 16-byte alignment) goes as 1x128 tiles instead.
    "triton"     moeco.fp8.triton_kernels.fp8_gemm_nt: any shape, CUDA or the interpreter (TMA loads
                 on Hopper).
    "wgmma"      moeco.fp8.cuda_gemm.fp8_gemm_nt: moeco's Hopper kernel (TMA, WGMMA, promotion in
                 registers; NVRTC). B scaled per 128x128 block or per row, K % 16 == 0, N % 8 == 0.
    "auto"       CUDA: the wgmma kernel for 128x128-blocked B where cuBLAS would need padding (N or K
                 not a multiple of 128: MLA's N = 576 and its Dgrad), where it measured faster on the
                 H200 (per-row B, Wgrad's, measured slower: cuBLAS keeps it); else scaled_mm where
                 this torch/GPU accepts block-wise scales, else triton.
                 gemm_kernel="wgmma" uses the kernel wherever it applies, "cublas" never.
                 CPU: reference.

On Hopper both GPU backends accumulate each 128-deep partial product in the Tensor Cores'
limited-precision accumulator before promoting it, so they differ from the reference by ~2e-4
(max error over max value), the size `emulate_hopper_accumulation(promotion=128)` predicts.

`emulate_hopper_accumulation` models the Tensor Core's accumulator for the precision study:
32 products are aligned to the largest exponent among them and the running sum, and everything
below 13 fraction bits is truncated ("FP22", ~14 bits with the implicit one; ISCA'25 section 3.1.1).
With `promotion=None` the whole K stays in that accumulator; with `promotion=128` it restarts
every 128 of K and the partial sums are added in FP32.
"""

from __future__ import annotations

import torch

from moeco.fp8 import cuda_gemm, triton_kernels
from moeco.fp8.format import BLOCK
from moeco.fp8.format import ceil_div as _ceil_div
from moeco.fp8.spec import BACKENDS, GEMM_KERNELS


def _b_scale_full(b_scale: torch.Tensor, N: int, KB: int) -> torch.Tensor:
    """(N, KB) per-row scales of B, from either 128x128 block scales or 1x128 tile scales."""
    if tuple(b_scale.shape) == (N, KB):
        return b_scale.float()
    if tuple(b_scale.shape) == (_ceil_div(N, BLOCK), KB):
        return b_scale.float().repeat_interleave(BLOCK, dim=0)[:N]
    raise ValueError(f"b_scale has shape {tuple(b_scale.shape)}; expected ({_ceil_div(N, BLOCK)}, {KB}) "
                     f"for 128x128 blocks or ({N}, {KB}) for 1x128 tiles of a ({N}, K) operand")


def _check(a_q, a_scale, b_q):
    if a_q.dim() != 2 or b_q.dim() != 2 or a_q.shape[1] != b_q.shape[1]:
        raise ValueError(f"fp8_gemm wants A (M, K) and B (N, K); got {tuple(a_q.shape)} and {tuple(b_q.shape)}")
    M, K = a_q.shape
    if tuple(a_scale.shape) != (M, _ceil_div(K, BLOCK)):
        raise ValueError(f"a_scale has shape {tuple(a_scale.shape)}; expected ({M}, {_ceil_div(K, BLOCK)})")


def fp8_gemm_reference(a_q, a_scale, b_q, b_scale, out_dtype=torch.float32):
    """The definition: FP32 partial products over 128 of K, scaled and accumulated in FP32."""
    _check(a_q, a_scale, b_q)
    M, K = a_q.shape
    N = b_q.shape[0]
    KB = _ceil_div(K, BLOCK)
    sb = _b_scale_full(b_scale, N, KB)
    sa = a_scale.float()
    out = torch.zeros((M, N), dtype=torch.float32, device=a_q.device)
    for kb in range(KB):
        ks = slice(kb * BLOCK, min(K, (kb + 1) * BLOCK))
        part = a_q[:, ks].float() @ b_q[:, ks].float().t()
        out += part * sa[:, kb, None] * sb[None, :, kb]
    return out.to(out_dtype)


def scaled_mm_fits(M: int, N: int, K: int) -> bool:
    """Shapes torch._scaled_mm takes without padding (it refuses N or K not multiples of 128)."""
    return N % BLOCK == 0 and K % BLOCK == 0 and M > 0


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    return t if t.shape[0] == rows else torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])


def _pad_cols(t: torch.Tensor, cols: int) -> torch.Tensor:
    return t if t.shape[1] == cols else torch.cat([t, t.new_zeros((t.shape[0], cols - t.shape[1]))], dim=1)


def fp8_gemm_scaled_mm(a_q, a_scale, b_q, b_scale, out_dtype=torch.bfloat16, *, unaligned_k: str = "expand"):
    """torch._scaled_mm with block-wise scales, padding what cuBLAS cannot take.

    What torch 2.11 checks (ATen's is_blockwise_* functions), and what cuBLAS needs on top:
    a (M, K) row-major; b passed as w.t() with w (N, K) row-major; scale_a (M, KB) with strides
    exactly (1, M), M a multiple of 4; a 128x128 scale_b (KB, NB) whose transpose is a contiguous
    (NB, KB) tensor with KB a multiple of 4 (a row stride that is not 16-byte aligned passes the
    check and gives wrong results); a 1x128 scale_b (KB, N) contiguous; N and K multiples of 128.
    Rows of A, rows of B and k-blocks are zero-padded up to those (zero FP8 values add nothing;
    padded scales are 1), and the output is cut back to (M, N).

    `unaligned_k`: a 128x128 B with a k-block count that is not a multiple of 4 (Dgrad of N = 576:
    5 k-blocks) is either given as 1x128 tiles, each row carrying its block's scale ("expand": the same
    numbers, K padded only to 640) or zero-padded to 8 k-blocks ("pad": K = 1024, 78% more work).
    N = 576 with 128x128 blocks is zero-padded to 640. Computing C^T = B . A^T instead (cuBLAS takes an
    M that is not a multiple of 128) measured slower on the H200 once the result is transposed back
    (0.063 vs 0.056 ms at 4096 tokens, 0.193 vs 0.149 at 16384; tools/fp8_gemm_tune.py, section n576).
    """
    _check(a_q, a_scale, b_q)
    M, K = a_q.shape
    N = b_q.shape[0]
    KB = a_scale.shape[1]
    blocks = tuple(b_scale.shape) == (_ceil_div(N, BLOCK), KB) and N != 1
    if not blocks and tuple(b_scale.shape) != (N, KB):
        _b_scale_full(b_scale, N, KB)  # raises the shape error
    if unaligned_k not in ("expand", "pad"):
        raise ValueError(f"unaligned_k={unaligned_k!r}; valid: expand, pad")
    if blocks and KB % 4 and unaligned_k == "expand":
        b_scale, blocks = _b_scale_full(b_scale, N, KB), False
    Mp, Np = _round_up(M, 4), _round_up(N, BLOCK)
    KBp = _round_up(KB, 4) if blocks else KB
    Kp = KBp * BLOCK
    a = _pad_cols(_pad_rows(a_q.contiguous(), Mp), Kp)
    b = _pad_cols(_pad_rows(b_q.contiguous(), Np), Kp)
    if a_scale.stride(0) == 1 and a_scale.stride(1) == M and (Mp, KBp) == (M, KB):
        sa = a_scale
    else:
        buf = torch.ones((KBp, Mp), dtype=torch.float32, device=a_q.device)
        buf[:KB, :M] = a_scale.t()
        sa = buf.t()
    if blocks:
        if b_scale.is_contiguous() and KBp == KB:
            sb = b_scale.t()
        else:
            buf = torch.ones((b_scale.shape[0], KBp), dtype=torch.float32, device=b_q.device)
            buf[:, :KB] = b_scale
            sb = buf.t()
    elif Np == N and b_scale.t().is_contiguous():  # 1x128 scale_b already (KB, N) row-major
        sb = b_scale.t()
    else:
        buf = torch.ones((KB, Np), dtype=torch.float32, device=b_q.device)
        buf[:, :N] = b_scale.t()
        sb = buf
    out = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=out_dtype)
    return out if (Mp, Np) == (M, N) else out[:M, :N].contiguous()


def fp8_gemm(a_q, a_scale, b_q, b_scale, out_dtype=torch.bfloat16, *, backend: str = "auto",
             gemm_kernel: str = "auto", tma: bool = True):
    """C (M, N) = A (M, K) . B (N, K)^T for FP8 operands with fine-grained scales; see module doc.
    `gemm_kernel` (auto, wgmma, cublas) and `tma` (Triton's TMA kernels allowed) are the recipe's."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown FP8 GEMM backend {backend!r}; valid: {', '.join(BACKENDS)}")
    if gemm_kernel not in GEMM_KERNELS:
        raise ValueError(f"gemm_kernel={gemm_kernel!r}; valid: {', '.join(GEMM_KERNELS)}")
    M, K = a_q.shape
    N = b_q.shape[0]
    if backend == "wgmma" or (backend == "auto" and a_q.is_cuda):
        mode = gemm_kernel
        blocked_b = tuple(b_scale.shape) == (_ceil_div(N, BLOCK), _ceil_div(K, BLOCK))
        prefer = mode == "wgmma" or (mode == "auto" and blocked_b and (N % BLOCK or K % BLOCK))
        if (backend == "wgmma" or prefer) and cuda_gemm.supported(a_q, a_scale, b_q, b_scale, out_dtype):
            out = cuda_gemm.fp8_gemm_nt(a_q, a_scale, b_q, b_scale, out_dtype)
            if out is not None:
                return out
        if backend == "wgmma":
            _check(a_q, a_scale, b_q)
            raise ValueError(f"the wgmma FP8 GEMM cannot take A {tuple(a_q.shape)}, B {tuple(b_q.shape)}, b_scale "
                             f"{tuple(b_scale.shape)} on {a_q.device} ({cuda_gemm.status()}); it needs Hopper, "
                             "B scaled per 128x128 block or per row, K % 16 == 0 and N % 8 == 0: use "
                             "backend='auto'")
    if backend == "auto":
        if not a_q.is_cuda:
            backend = "reference"
        elif _scaled_mm_ok(a_q.device, tuple(b_scale.shape) == (N, _ceil_div(K, BLOCK))):
            backend = "scaled_mm"
        else:
            backend = "triton" if triton_kernels.available(a_q.device) else "reference"
    if backend == "reference":
        return fp8_gemm_reference(a_q, a_scale, b_q, b_scale, out_dtype)
    if backend == "scaled_mm":
        return fp8_gemm_scaled_mm(a_q, a_scale, b_q, b_scale, out_dtype)
    _check(a_q, a_scale, b_q)
    _b_scale_full(b_scale, N, a_scale.shape[1])  # validates the scale shape
    return triton_kernels.fp8_gemm_nt(a_q, a_scale, b_q, b_scale, out_dtype, tma=None if tma else False)


_SCALED_MM_PROBE: dict = {}


def _scaled_mm_ok(device: torch.device, b_rowwise: bool) -> bool:
    """Whether this device and torch build accept block-wise _scaled_mm (probed once per case)."""
    key = (str(device), b_rowwise)
    if key not in _SCALED_MM_PROBE:
        try:
            a = torch.ones((128, 128), device=device).to(torch.float8_e4m3fn)
            sa = torch.ones((128, 1), device=device)
            sb = torch.ones((128, 1) if b_rowwise else (1, 1), device=device)
            out = fp8_gemm_scaled_mm(a, sa, a, sb, torch.float32)
            _SCALED_MM_PROBE[key] = bool(torch.allclose(out, torch.full_like(out, 128.0)))
        except (RuntimeError, NotImplementedError):
            _SCALED_MM_PROBE[key] = False
    return _SCALED_MM_PROBE[key]


# ----------------------------------------------------------------------------------------------
# The accumulation-precision study (CPU, float64): why DeepSeek promotes every 128 of K.


def _truncate_to_quantum(x: torch.Tensor, exp: torch.Tensor, frac_bits: int) -> torch.Tensor:
    quantum = torch.ldexp(torch.ones_like(x), exp - frac_bits)
    return torch.trunc(x / quantum) * quantum


def _fp22_sum(acc: torch.Tensor, terms: torch.Tensor, frac_bits: int) -> torch.Tensor:
    """acc (M, N) + sum of terms (M, N, g), aligned to the largest exponent and truncated."""
    allv = torch.cat([acc.unsqueeze(-1), terms], dim=-1)
    _, e = torch.frexp(allv.abs().amax(dim=-1, keepdim=True))  # max = m * 2^e, m in [0.5, 1)
    e = e - 1  # floor(log2(max))
    s = _truncate_to_quantum(allv, e, frac_bits).sum(dim=-1)
    _, es = torch.frexp(s)
    return _truncate_to_quantum(s, es - 1, frac_bits)  # the sum is stored in an FP22 register


def emulate_hopper_accumulation(a_q, a_scale, b_q, b_scale, *, promotion: int | None = 128,
                                mma_k: int = 32, frac_bits: int = 13) -> torch.Tensor:
    """The FP8 GEMM with a limited-precision accumulator, in float64; returns float64 (M, N).

    promotion=None: K accumulates entirely in the limited accumulator (the block scales are
    folded into the operands first, as a tensor-wise-scaled GEMM would see them).
    promotion=128: the limited accumulator restarts every 128 of K; its partial sums are scaled
    and added in FP32 (emulated in float64, rounded to float32).
    """
    _check(a_q, a_scale, b_q)
    M, K = a_q.shape
    N = b_q.shape[0]
    KB = _ceil_div(K, BLOCK)
    sa = a_scale.double().repeat_interleave(BLOCK, dim=1)[:, :K]
    sb = _b_scale_full(b_scale, N, KB).double().repeat_interleave(BLOCK, dim=1)[:, :K]
    a = a_q.double()
    b = b_q.double()
    if promotion is None:
        a, b = a * sa, b * sb
        acc = torch.zeros((M, N), dtype=torch.float64)
        for k0 in range(0, K, mma_k):
            terms = a[:, None, k0:k0 + mma_k] * b[None, :, k0:k0 + mma_k]
            acc = _fp22_sum(acc, terms, frac_bits)
        return acc
    if promotion % mma_k or BLOCK % promotion:
        raise ValueError(f"promotion interval {promotion} must be a multiple of mma_k={mma_k} that divides 128")
    out = torch.zeros((M, N), dtype=torch.float64)
    for p0 in range(0, K, promotion):
        acc = torch.zeros((M, N), dtype=torch.float64)
        for k0 in range(p0, min(K, p0 + promotion), mma_k):
            terms = a[:, None, k0:k0 + mma_k] * b[None, :, k0:k0 + mma_k]
            acc = _fp22_sum(acc, terms, frac_bits)
        out = (out + acc * sa[:, None, p0] * sb[None, :, p0]).float().double()
    return out


__all__ = ["BACKENDS", "emulate_hopper_accumulation", "fp8_gemm", "fp8_gemm_reference", "fp8_gemm_scaled_mm",
           "scaled_mm_fits"]
