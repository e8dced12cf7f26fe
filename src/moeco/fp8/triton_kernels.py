"""Triton kernels for the FP8 recipe: fused 1x128 quantization and a block-scaled FP8 GEMM.

Each kernel has a plain PyTorch reference (`moeco.fp8.quantize`, `moeco.fp8.gemm`) and a test
that compares the two on fresh random inputs, on CPU under `TRITON_INTERPRET=1` and on CUDA.

quantize_act_1x128 (one program per BLOCK_M rows x 128 channels):
    read x (bf16/fp32) once, amax per row of the tile, s = max(amax, 1e-4) / 448
    (or rounded up to a power of two), write e4m3(x / s) and s. Bytes moved: 2 + 1 per element
    for bf16 input, + 4 per 128 for the scale: the floor is that over HBM bandwidth.
quantize_act_1x128_t: the same tiles taken along dim 0 and written transposed (x (T, C) ->
    q (C, T), s (C, ceil(T/128))), optionally from FP8 input dequantized on the fly. This is
    the 1x128 -> 128x1 re-tiling Wgrad needs (both operands scaled along the token dim).
fp8_gemm_nt: C (M, N) = A (M, K) . B (N, K)^T with A scaled per 1x128 tile and B per 128x128
    block or per 1x128 tile. One tl.dot over 128 of K at a time into a fresh FP32 tile, which
    is then multiplied by its two scales and added to the FP32 accumulator: the promotion
    interval N_C = 128 of DeepSeek-V3, section 3.3.

Interpreter notes: Triton's interpreter rounds float32 -> float8 wrongly near binade edges, so
under TRITON_INTERPRET=1 the kernels first round to the E4M3 grid with integer arithmetic (exact,
round-to-nearest-even) and the cast only changes the container. bf16 dots are wrong in the
interpreter, so the GEMM upcasts its operands to fp32 there (FP8 products are exact in fp32).
"""

from __future__ import annotations

import os

import torch

try:  # Triton is optional: every caller has a PyTorch path.
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised where triton is absent
    _HAVE_TRITON = False

FP8_DTYPE = torch.float8_e4m3fn


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device | str | None = None) -> bool:
    """Triton can run here: on CUDA tensors, or on CPU tensors under the interpreter."""
    if not _HAVE_TRITON:
        return False
    if device is not None and torch.device(device).type == "cpu":
        return interpreting()
    return True


if _HAVE_TRITON:

    @triton.jit
    def _round_to_e4m3_grid(v):
        # Round-to-nearest-even to 3 mantissa bits for |v| >= 2^-6 (normal E4M3), and to a
        # multiple of 2^-9 below (subnormals): 24576 = 1.5 * 2^14, so a + 24576 keeps 9 bits.
        # Works on |v| and restores the sign, so that tiny negatives become -0 as in torch.
        a = tl.abs(v)
        bits = a.to(tl.int32, bitcast=True)
        lsb = (bits >> 20) & 1
        normal = ((bits + 0x7FFFF + lsb) & ~0xFFFFF).to(tl.float32, bitcast=True)
        sub = (a + 24576.0) - 24576.0
        r = tl.where(a < 0.015625, sub, normal)
        return tl.where(v < 0, -r, r)

    @triton.jit
    def _scale_from_amax(amax, POW2: tl.constexpr):
        s = tl.maximum(amax, 1e-4) / 448.0
        if POW2:  # round up to a power of two, exactly, on the float32 bits
            s = ((s.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
        return s

    @triton.jit
    def _quant_act_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sk,
                          BLOCK_M: tl.constexpr, POW2: tl.constexpr, EMULATE_CAST: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_k = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_k * 128 + tl.arange(0, 128)
        mask = (rows < M)[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        s = _scale_from_amax(tl.max(tl.abs(x), axis=1), POW2)
        v = tl.math.div_rn(x, s[:, None])
        if EMULATE_CAST:
            v = _round_to_e4m3_grid(v)
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], v.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + rows * stride_sm + pid_k * stride_sk, s, mask=rows < M)

    @triton.jit
    def _quant_act_t_kernel(x_ptr, xs_ptr, q_ptr, s_ptr, T, C, stride_xt, stride_xst, stride_xsc,
                            stride_qc, stride_sc, stride_st, BLOCK_C: tl.constexpr,
                            FROM_FP8: tl.constexpr, POW2: tl.constexpr, EMULATE_CAST: tl.constexpr):
        # Tile: 128 tokens x BLOCK_C channels of x (T, C); amax over the tokens; written as
        # q (C, T) and s (C, ceil(T/128)).
        pid_t = tl.program_id(0)
        pid_c = tl.program_id(1)
        toks = pid_t * 128 + tl.arange(0, 128)
        chans = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (toks < T)[:, None] & (chans < C)[None, :]
        x = tl.load(x_ptr + toks[:, None] * stride_xt + chans[None, :], mask=mask, other=0.0).to(tl.float32)
        if FROM_FP8:  # dequantize the 1x128 (along C) tiles on the fly
            xs = tl.load(xs_ptr + toks[:, None] * stride_xst + (chans // 128)[None, :] * stride_xsc,
                         mask=mask, other=0.0)
            x = x * xs
        s = _scale_from_amax(tl.max(tl.abs(x), axis=0), POW2)  # (BLOCK_C,)
        v = tl.math.div_rn(x, s[None, :])
        if EMULATE_CAST:
            v = _round_to_e4m3_grid(v)
        tl.store(q_ptr + chans[None, :] * stride_qc + toks[:, None], v.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + chans * stride_sc + pid_t * stride_st, s, mask=chans < C)

    @triton.jit
    def _fp8_gemm_nt_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K,
                            stride_am, stride_bn, stride_cm, stride_asm, stride_ask, stride_bsn, stride_bsk,
                            B_SCALE_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            GROUP_M: tl.constexpr, UPCAST: tl.constexpr):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        group = GROUP_M * num_n  # grouped order: neighbouring programs share B tiles in L2
        first_m = (pid // group) * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group) % size_m
        pid_n = (pid % group) // size_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, 128)
        m_ok = offs_m < M
        n_ok = offs_n < N
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None]
        as_ptrs = as_ptr + offs_m * stride_asm
        bs_ptrs = bs_ptr + (offs_n // B_SCALE_ROWS) * stride_bsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, tl.cdiv(K, 128)):
            k_ok = offs_k < K - kb * 128
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            part = tl.dot(a, b, out_dtype=tl.float32)  # unscaled, over 128 of K
            sa = tl.load(as_ptrs + kb * stride_ask, mask=m_ok, other=0.0)
            sb = tl.load(bs_ptrs + kb * stride_bsk, mask=n_ok, other=0.0)
            acc += part * sa[:, None] * sb[None, :]  # the promotion: scaled, in FP32
            a_ptrs += 128
            b_ptrs += 128
        c = acc.to(c_ptr.dtype.element_ty)
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], c, mask=m_ok[:, None] & n_ok[None, :])


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def quantize_act_1x128(x: torch.Tensor, *, pow2_scale: bool = False, block_m: int = 32):
    """Triton version of `moeco.fp8.quantize.quantize_act_1x128_reference`.

    The scale comes back as a (*, ceil(K/128)) view of a (ceil(K/128), rows) buffer
    ("outer-dim-major"), the layout `torch._scaled_mm` wants for a block-wise `scale_a`.
    """
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    kb = _ceil_div(K, 128)
    q = torch.empty((M, K), dtype=FP8_DTYPE, device=x.device)
    s_t = torch.empty((kb, M), dtype=torch.float32, device=x.device)
    if interpreting():
        block_m = min(block_m, 4)
    grid = (_ceil_div(M, block_m), kb)
    _quant_act_kernel[grid](x2, q, s_t, M, K, x2.stride(0), q.stride(0), 1, M,
                            BLOCK_M=block_m, POW2=pow2_scale, EMULATE_CAST=interpreting(),
                            num_warps=4 if block_m >= 16 else 1)
    return q.reshape(*lead, K), s_t.t().reshape(*lead, kb)


def quantize_act_1x128_t(x: torch.Tensor, x_scale: torch.Tensor | None = None, *, pow2_scale: bool = False,
                         block_c: int = 64):
    """Quantize x (T, C) along T: returns q (C, T) E4M3 and s (C, ceil(T/128)).

    With `x_scale` (T, ceil(C/128)), x is FP8 with 1x128 scales and is dequantized in the kernel.
    Reference: `quantize_act_1x128_reference(x_dequantized.t())`.
    """
    T, C = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    tb = _ceil_div(T, 128)
    q = torch.empty((C, T), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((C, tb), dtype=torch.float32, device=x.device)
    xs = x_scale if x_scale is not None else s  # a placeholder pointer when unused
    if interpreting():
        block_c = min(block_c, 16)
    grid = (tb, _ceil_div(C, block_c))
    _quant_act_t_kernel[grid](x, xs, q, s, T, C, x.stride(0), xs.stride(0), xs.stride(1),
                              q.stride(0), s.stride(0), s.stride(1), BLOCK_C=block_c,
                              FROM_FP8=x_scale is not None, POW2=pow2_scale, EMULATE_CAST=interpreting(),
                              num_warps=4)
    return q, s


def fp8_gemm_nt(a_q, a_scale, b_q, b_scale, out_dtype=torch.bfloat16, *, block_m=128, block_n=128,
                group_m=8, num_warps=8, num_stages=3):
    """C = A . B^T with A (M, K) 1x128-scaled and B (N, K) 128x128- or 1x128-scaled, FP32 promotion."""
    M, K = a_q.shape
    N = b_q.shape[0]
    kb = _ceil_div(K, 128)
    b_rows = 128 if tuple(b_scale.shape) == (_ceil_div(N, 128), kb) else 1
    c = torch.empty((M, N), dtype=out_dtype, device=a_q.device)
    if interpreting():
        block_m, block_n, num_warps, num_stages = 16, 16, 1, 1
    grid = (_ceil_div(M, block_m) * _ceil_div(N, block_n),)
    _fp8_gemm_nt_kernel[grid](a_q, b_q, c, a_scale, b_scale, M, N, K, a_q.stride(0), b_q.stride(0),
                              c.stride(0), a_scale.stride(0), a_scale.stride(1), b_scale.stride(0),
                              b_scale.stride(1), B_SCALE_ROWS=b_rows, BLOCK_M=block_m, BLOCK_N=block_n,
                              GROUP_M=group_m, UPCAST=interpreting(), num_warps=num_warps,
                              num_stages=num_stages)
    return c
