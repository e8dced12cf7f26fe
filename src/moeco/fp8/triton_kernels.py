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
quantize_weight_128x128: one program per 128x128 block of a (*, N, K) weight; optionally also
    writes the transposed FP8 copy (*, K, N) that Dgrad reads, in the same pass.
fp8_gemm_nt: C (M, N) = A (M, K) . B (N, K)^T with A scaled per 1x128 tile and B per 128x128
    block or per 1x128 tile. One tl.dot over 128 of K at a time into a fresh FP32 tile, which
    is then multiplied by its two scales and added to the FP32 accumulator: the promotion
    interval N_C = 128 of DeepSeek-V3, section 3.3.
fp8_grouped_gemm_nt: the same GEMM for all routed experts in one launch (tokens sorted by expert,
    offs = cumulative end rows): Fprop (x . W_e^T) and Dgrad (dy . W_e, with W_e^T from the weight
    quantization). A device-side tile -> expert map (`grouped_tile_map`) avoids a host sync.
grouped_wgrad_gemm: dW_e = dy_e^T . x_e for all experts in one launch, from operands re-tiled 128x1
    with each expert's tokens at a 128-aligned start (`moeco.fp8.grouped_wgrad`); every program sums
    over its expert's tokens.
*_tma variants (Hopper on, `use_tma`): the same GEMMs with operand tiles loaded through TMA tensor
    descriptors (out-of-bounds reads are zeros, so the k-loop has no masks); the dense one is
    persistent (one program per SM). The grouped Fprop/Dgrad went from 0.77-0.90x to 1.02-1.14x
    CUTLASS's BF16 grouped GEMM with them on the H200 (BENCHMARKS.md).

Interpreter notes: Triton's interpreter rounds float32 -> float8 wrongly near binade edges, so
under TRITON_INTERPRET=1 the kernels first round to the E4M3 grid with integer arithmetic (exact,
round-to-nearest-even) and the cast only changes the container. bf16 dots are wrong in the
interpreter, so the GEMM upcasts its operands to fp32 there (FP8 products are exact in fp32).
"""

from __future__ import annotations

import torch

from moeco.fp8 import cuda_gemm, cuda_kernels
from moeco.fp8.cuda_kernels import MAX_GRID_Y as _MAX_GRID_Y
from moeco.fp8.format import FP8_DTYPE
from moeco.fp8.format import ceil_div as _ceil_div
from moeco.triton_support import HAVE_TRITON, available, interpreting

if HAVE_TRITON:  # Triton is optional: every caller has a PyTorch path.
    import triton
    import triton.language as tl

# `fast_div` (the 1x128 and weight quantizations): divide by the scale through its reciprocal and
# Markstein's correction (the same bits as a division, fewer instructions; H200: weights 1.16x, 1x128
# 1.03-1.08x). The 128x1 kernel keeps div_rn, which measured faster there (0.90-0.99x otherwise;
# tools/fp8_gemm_tune.py --only div). fast_div=False: div_rn (for the bench's comparison).


if HAVE_TRITON:

    @triton.jit
    def _round_to_e4m3_grid(v):
        # Round-to-nearest-even to 3 mantissa bits for |v| >= 2^-6 (normal E4M3), and to a
        # multiple of 2^-9 below (subnormals): 24576 = 1.5 * 2^14, so a + 24576 keeps 9 bits.
        # Works on |v| and restores the sign bit, so that tiny negatives and -0 itself become -0
        # as in torch.
        a = tl.abs(v)
        bits = a.to(tl.int32, bitcast=True)
        lsb = (bits >> 20) & 1
        normal = ((bits + 0x7FFFF + lsb) & ~0xFFFFF).to(tl.float32, bitcast=True)
        sub = (a + 24576.0) - 24576.0
        r = tl.where(a < 0.015625, sub, normal)
        return tl.where(v.to(tl.int32, bitcast=True) < 0, -r, r)

    @triton.jit
    def _scale_from_amax(amax, POW2: tl.constexpr):
        s = tl.math.div_rn(tl.maximum(amax, 1e-4), 448.0)  # IEEE, as the reference (`/` is approximate)
        if POW2:  # round up to a power of two, exactly, on the float32 bits
            s = ((s.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
        return s

    @triton.jit
    def _div_by_scale(x, s, FAST_DIV: tl.constexpr):
        # x / s, correctly rounded, s broadcast over x. FAST_DIV: one reciprocal per scale (div_rn)
        # and, per element, a product and Markstein's correction q + (x - q*s) * (1/s), two fused
        # multiply-adds, instead of a full IEEE division; the same bits (checked against div_rn on
        # the GPU, tests/test_fp8_gpu.py). Not under the interpreter, whose fma is not fused. The
        # select keeps -0 (the correction would give +0), as the division does.
        if FAST_DIV:
            r = tl.math.div_rn(s * 0.0 + 1.0, s)  # 1 / s, of s's shape (a 0-d s in the weight kernel)
            q = x * r
            q = tl.fma(tl.fma(-q, s, x), r, q)
            return tl.where(x == 0.0, x, q)
        else:
            return tl.math.div_rn(x, s)

    @triton.jit
    def _swizzle(pid, n_outer, n_inner, GROUP: tl.constexpr):
        # Grouped program order over (outer, inner) output tiles: GROUP outer tiles at a time, the
        # outer index fastest within a group, so that neighbouring programs share tiles in L2.
        per_group = GROUP * n_inner
        first = (pid // per_group) * GROUP
        size = tl.minimum(n_outer - first, GROUP)
        local = pid % per_group
        return first + local % size, local // size

    @triton.jit
    def _quant_act_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sk,
                          BLOCK_M: tl.constexpr, GROUPS: tl.constexpr, POW2: tl.constexpr,
                          EMULATE_CAST: tl.constexpr, FAST_DIV: tl.constexpr, K_FAST: tl.constexpr):
        # One program per BLOCK_M rows x GROUPS tiles of 128 channels. K_FAST: the grid's fast axis walks
        # the channel blocks, so concurrent programs read and write whole rows.
        if K_FAST:
            pid_k = tl.program_id(0)
            pid_m = tl.program_id(1)
        else:  # more row blocks than a grid's y dimension takes
            pid_m = tl.program_id(0)
            pid_k = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_k * (128 * GROUPS) + tl.arange(0, 128 * GROUPS)
        mask = (rows < M)[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        x3 = tl.reshape(x, (BLOCK_M, GROUPS, 128))
        s = _scale_from_amax(tl.max(tl.abs(x3), axis=2), POW2)  # (BLOCK_M, GROUPS)
        v = tl.reshape(_div_by_scale(x3, s[:, :, None], FAST_DIV), (BLOCK_M, 128 * GROUPS))
        if EMULATE_CAST:
            v = _round_to_e4m3_grid(v)
        tl.store(q_ptr + rows.to(tl.int64)[:, None] * stride_qm + cols[None, :], v.to(q_ptr.dtype.element_ty),
                 mask=mask)
        kbs = pid_k * GROUPS + tl.arange(0, GROUPS)
        tl.store(s_ptr + rows[:, None] * stride_sm + kbs[None, :] * stride_sk, s,
                 mask=(rows < M)[:, None] & (kbs < tl.cdiv(K, 128))[None, :])

    @triton.jit
    def _quant_act_t_kernel(x_ptr, xs_ptr, rows_ptr, q_ptr, s_ptr, T, C, stride_xt, stride_xst, stride_xsc,
                            stride_qc, stride_sc, stride_st, BLOCK_C: tl.constexpr, GATHER: tl.constexpr,
                            FROM_FP8: tl.constexpr, POW2: tl.constexpr, EMULATE_CAST: tl.constexpr,
                            TRANS_STORE: tl.constexpr, FAST_DIV: tl.constexpr):
        # Tile: 128 output tokens x BLOCK_C channels; amax over the tokens; written as q (C, T) and
        # s (C, ceil(T/128)). With GATHER, output token t reads row rows[t] of x (-1: a zero row),
        # so that the caller's padded layout is never materialized.
        pid_t = tl.program_id(0)
        pid_c = tl.program_id(1)
        toks = pid_t * 128 + tl.arange(0, 128)
        chans = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        if GATHER:
            src = tl.load(rows_ptr + toks, mask=toks < T, other=-1)
            tok_ok = src >= 0
            src = tl.where(tok_ok, src, 0).to(tl.int64)
        else:
            src = toks.to(tl.int64)
            tok_ok = toks < T
        mask = tok_ok[:, None] & (chans < C)[None, :]
        x = tl.load(x_ptr + src[:, None] * stride_xt + chans[None, :], mask=mask, other=0.0).to(tl.float32)
        if FROM_FP8:  # dequantize the 1x128 (along C) tiles on the fly
            xs = tl.load(xs_ptr + src[:, None] * stride_xst + (chans // 128)[None, :] * stride_xsc,
                         mask=mask, other=0.0)
            x = x * xs
        s = _scale_from_amax(tl.max(tl.abs(x), axis=0), POW2)  # (BLOCK_C,)
        v = _div_by_scale(x, s[None, :], FAST_DIV)
        if EMULATE_CAST:
            v = _round_to_e4m3_grid(v)
        out_mask = (toks < T)[:, None] & (chans < C)[None, :]
        if TRANS_STORE:  # transpose the 1-byte tile, then store rows of q: channel-major, token-contiguous
            q_ct = tl.trans(v.to(q_ptr.dtype.element_ty))
            tl.store(q_ptr + chans.to(tl.int64)[:, None] * stride_qc + toks[None, :], q_ct, mask=tl.trans(out_mask))
        else:
            tl.store(q_ptr + chans[None, :] * stride_qc + toks[:, None], v.to(q_ptr.dtype.element_ty), mask=out_mask)
        tl.store(s_ptr + chans * stride_sc + pid_t * stride_st, s, mask=chans < C)

    @triton.jit
    def _quant_weight_kernel(w_ptr, q_ptr, qt_ptr, s_ptr, N, K, stride_we, stride_wn, stride_qe, stride_qn,
                             stride_qte, stride_qtk, stride_se, stride_sn, stride_sk,
                             POW2: tl.constexpr, EMULATE_CAST: tl.constexpr, WRITE_T: tl.constexpr,
                             FAST_DIV: tl.constexpr):
        # One program per 128x128 block of matrix e of w (E, N, K): amax over the block, one scale;
        # q (E, N, K) and, with WRITE_T, q^T (E, K, N) (the Dgrad operand), and s (E, NB, KB).
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        e = tl.program_id(2).to(tl.int64)
        rows = pid_n * 128 + tl.arange(0, 128)
        cols = pid_k * 128 + tl.arange(0, 128)
        mask = (rows < N)[:, None] & (cols < K)[None, :]
        x = tl.load(w_ptr + e * stride_we + rows[:, None] * stride_wn + cols[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        s = _scale_from_amax(tl.max(tl.max(tl.abs(x), axis=1), axis=0), POW2)
        v = _div_by_scale(x, s, FAST_DIV)
        if EMULATE_CAST:
            v = _round_to_e4m3_grid(v)
        q = v.to(q_ptr.dtype.element_ty)
        tl.store(q_ptr + e * stride_qe + rows[:, None] * stride_qn + cols[None, :], q, mask=mask)
        if WRITE_T:
            tl.store(qt_ptr + e * stride_qte + cols[None, :] * stride_qtk + rows[:, None], q, mask=mask)
        tl.store(s_ptr + e * stride_se + pid_n * stride_sn + pid_k * stride_sk, s)

    @triton.jit
    def _promoted_k_loop(a_ptrs, b_ptrs, as_ptrs, bs_ptrs, m_ok, n_ok, offs_k, K, kb_end, stride_ask, stride_bsk,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
        """sum over k-blocks kb < kb_end of (A_kb . B_kb) * sa_kb * sb_kb: each 128-deep FP8 product
        scaled and added in FP32 (the promotion). A tile rows x 128 (K contiguous), B 128 x cols."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(0, kb_end):
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
        return acc

    @triton.jit
    def _fp8_gemm_nt_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, M, N, K,
                            stride_am, stride_bn, stride_cm, stride_asm, stride_ask, stride_bsn, stride_bsk,
                            B_SCALE_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            GROUP_M: tl.constexpr, UPCAST: tl.constexpr):
        # grouped order: neighbouring programs share B tiles in L2
        pid_m, pid_n = _swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, 128)
        m_ok = offs_m < M
        n_ok = offs_n < N
        a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + offs_n[None, :] * stride_bn + offs_k[:, None]
        as_ptrs = as_ptr + offs_m * stride_asm
        bs_ptrs = bs_ptr + (offs_n // B_SCALE_ROWS) * stride_bsn
        acc = _promoted_k_loop(a_ptrs, b_ptrs, as_ptrs, bs_ptrs, m_ok, n_ok, offs_k, K, tl.cdiv(K, 128),
                               stride_ask, stride_bsk, BLOCK_M, BLOCK_N, UPCAST)
        c = acc.to(c_ptr.dtype.element_ty)
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], c, mask=m_ok[:, None] & n_ok[None, :])


    @triton.jit
    def _promoted_k_loop_tma(a_desc, b_desc, a_row, b_row, kb0, kb1, as_ptrs, m_ok, stride_ask, bs_ptrs, n_ok,
                             stride_bsk, SCALAR_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             UPCAST: tl.constexpr):
        """_promoted_k_loop over k-blocks kb0 .. kb1 with TMA loads: A rows a_row.., B rows b_row..
        (both K-contiguous; out-of-bounds reads are zeros, so no masks). SCALAR_B: bs_ptrs is one
        pointer (one B scale per tile and k-block), else one per column."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(kb0, kb1):
            a = a_desc.load([a_row, kb * 128])
            b = b_desc.load([b_row, kb * 128])
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            part = tl.dot(a, b.T, out_dtype=tl.float32)  # unscaled, over 128 of K
            sa = tl.load(as_ptrs + kb * stride_ask, mask=m_ok, other=0.0)
            if SCALAR_B:
                sb = tl.load(bs_ptrs + kb * stride_bsk)
                acc += part * (sa * sb)[:, None]
            else:
                sb = tl.load(bs_ptrs + kb * stride_bsk, mask=n_ok, other=0.0)
                acc += part * sa[:, None] * sb[None, :]
        return acc

    @triton.jit
    def _tile_of_expert(map_ptr, pid_m, num_tiles, E):
        # Row pid_m of the grouped tile map: (expert, first row, end row); real is False for the
        # zero-filled group E past offs[-1].
        e = tl.load(map_ptr + pid_m)
        row0 = tl.load(map_ptr + num_tiles + pid_m)
        row1 = tl.load(map_ptr + 2 * num_tiles + pid_m)
        real = e < E
        return tl.where(real, e, 0), row0, row1, real

    @triton.jit
    def _fp8_gemm_nt_tma_kernel(a_desc, b_desc, c_desc, as_ptr, bs_ptr, M, N, K,
                                stride_asm, stride_ask, stride_bsn, stride_bsk,
                                B_SCALE_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                GROUP_M: tl.constexpr, NUM_PROGS: tl.constexpr, UPCAST: tl.constexpr):
        # Persistent: program p takes output tiles p, p + NUM_PROGS, ... (grouped order). Operand
        # tiles come through TMA descriptors (out-of-bounds reads are zeros, out-of-bounds writes
        # are dropped), so no masks sit in the k-loop. The promotion is the same as _promoted_k_loop.
        start = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        num_tiles = num_m * num_n
        kb_end = tl.cdiv(K, 128)
        SCALAR_B: tl.constexpr = B_SCALE_ROWS == 128 and BLOCK_N == 128  # one B scale per tile and k-block
        for tile in tl.range(start, num_tiles, NUM_PROGS):
            pid_m, pid_n = _swizzle(tile, num_m, num_n, GROUP_M)
            off_m = pid_m * BLOCK_M
            off_n = pid_n * BLOCK_N
            offs_m = off_m + tl.arange(0, BLOCK_M)
            offs_n = off_n + tl.arange(0, BLOCK_N)
            m_ok = offs_m < M
            n_ok = offs_n < N
            if SCALAR_B:
                bs_ptrs = bs_ptr + pid_n * stride_bsn
            else:
                bs_ptrs = bs_ptr + (offs_n // B_SCALE_ROWS) * stride_bsn
            acc = _promoted_k_loop_tma(a_desc, b_desc, off_m, off_n, 0, kb_end, as_ptr + offs_m * stride_asm, m_ok,
                                       stride_ask, bs_ptrs, n_ok, stride_bsk, SCALAR_B, BLOCK_M, BLOCK_N, UPCAST)
            c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


def quantize_act_1x128(x: torch.Tensor, *, pow2_scale: bool = False, block_m: int = 8, groups: int = 4,
                       num_warps: int = 4, fast_div: bool = True):
    """Triton version of `moeco.fp8.quantize.quantize_act_1x128_reference`.

    The scale comes back as a (*, ceil(K/128)) view of a (ceil(K/128), rows) buffer
    ("outer-dim-major"), the layout `torch._scaled_mm` wants for a block-wise `scale_a`.
    Each program quantizes block_m rows x `groups` tiles of 128 channels (groups a power of two), the
    programs ordered channel blocks first. Default tile 8 x 512 from a sweep on the H200 (GPU time,
    BENCHMARKS.md): 69-71% of HBM bandwidth at 4096 x 7168 and 84% at 16384 x 7168 over
    four machine starts, 1-3 points above a 16 x 256 tile with row blocks first in the same
    runs; the configurations tried were within ~5% of each other.
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
    k_fast = _ceil_div(M, block_m) <= _MAX_GRID_Y
    grid = (_ceil_div(kb, groups), _ceil_div(M, block_m))
    _quant_act_kernel[grid if k_fast else grid[::-1]](
        x2, q, s_t, M, K, x2.stride(0), q.stride(0), 1, M, BLOCK_M=block_m, GROUPS=groups, POW2=pow2_scale,
        EMULATE_CAST=interpreting(), FAST_DIV=fast_div and not interpreting(), K_FAST=k_fast,
        num_warps=num_warps)
    return q.reshape(*lead, K), s_t.t().reshape(*lead, kb)


def quantize_act_1x128_t(x: torch.Tensor, x_scale: torch.Tensor | None = None, *, pow2_scale: bool = False,
                         block_c: int = 32, rows: torch.Tensor | None = None, num_warps: int = 4,
                         trans_store: bool | None = None):
    """Quantize x (T, C) along T: returns q (C, T) E4M3 and s (C, ceil(T/128)) with strides (1, C).

    With `x_scale` (T, ceil(C/128)), x is FP8 with 1x128 scales and is dequantized in the kernel.
    With `rows` (T', ) int32, output token t is x's row rows[t], or a zero row where rows[t] < 0:
    q (C, T'), without building the gathered copy (the grouped Wgrad's per-expert padding).
    Reference: `quantize_act_1x128_reference(x_dequantized[rows].t())`.
    `trans_store`: transpose the FP8 tile in registers and store channel rows (H200, 16384 x 7168 from
    FP8: 0.124 vs 0.135 ms; from bf16 the same; tools/fp8_gemm_tune.py, section retile). None (the
    default) takes it except for FP8 input read through `rows`, where it measured 1.7x slower (the
    grouped Wgrad at the `small` preset's shapes, 106624 x 1536: 0.401 vs 0.228 ms, x 768: 0.208 vs
    0.120; from bf16 0.215 vs 0.217; section retile_moe).
    """
    if trans_store is None:
        trans_store = not (rows is not None and x_scale is not None)
    T, C = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    T_out = T if rows is None else rows.numel()
    tb = _ceil_div(T_out, 128)
    q = torch.empty((C, T_out), dtype=FP8_DTYPE, device=x.device)
    # (C, tb) scales stored outer-dim-major (strides (1, C)): _scaled_mm takes them without a copy
    s = torch.empty((tb, C), dtype=torch.float32, device=x.device).t()
    if T_out == 0 or C == 0:
        return q, s
    xs = x_scale if x_scale is not None else s  # a placeholder pointer when unused
    if rows is not None and rows.dtype != torch.int32:
        rows = rows.to(torch.int32)
    if interpreting():
        block_c = min(block_c, 16)
    grid = (tb, _ceil_div(C, block_c))
    _quant_act_t_kernel[grid](x, xs, rows if rows is not None else s, q, s, T_out, C, x.stride(0), xs.stride(0),
                              xs.stride(1), q.stride(0), s.stride(0), s.stride(1), BLOCK_C=block_c,
                              GATHER=rows is not None, FROM_FP8=x_scale is not None, POW2=pow2_scale,
                              EMULATE_CAST=interpreting(), TRANS_STORE=trans_store, FAST_DIV=False,
                              num_warps=num_warps)
    return q, s


def quantize_weight_128x128(w: torch.Tensor, *, pow2_scale: bool = False, transposed: bool = False,
                            fast_div: bool = True):
    """Triton version of `moeco.fp8.quantize.quantize_weight_128x128` (bit-exact), w (*, N, K).

    Returns (q, scale), or (q, scale, q_t) with `transposed=True`: q_t (*, K, N) contiguous is q with
    its last two dims swapped (the Dgrad operand; its 128x128 scales are scale.transpose(-1, -2)).
    """
    *lead, N, K = w.shape
    w3 = w.reshape(-1, N, K)
    if w3.stride(-1) != 1:
        w3 = w3.contiguous()
    E = w3.shape[0]
    nb, kb = _ceil_div(N, 128), _ceil_div(K, 128)
    q = torch.empty((E, N, K), dtype=FP8_DTYPE, device=w.device)
    qt = torch.empty((E, K, N), dtype=FP8_DTYPE, device=w.device) if transposed else q
    s = torch.empty((E, nb, kb), dtype=torch.float32, device=w.device)
    if w3.numel() > 0:
        _quant_weight_kernel[(nb, kb, E)](w3, q, qt, s, N, K, w3.stride(0), w3.stride(1), q.stride(0), q.stride(1),
                                          qt.stride(0), qt.stride(1), s.stride(0), s.stride(1), s.stride(2),
                                          POW2=pow2_scale, EMULATE_CAST=interpreting(), WRITE_T=transposed,
                                          FAST_DIV=fast_div and not interpreting(), num_warps=8)
    out = (q.reshape(*lead, N, K), s.reshape(*lead, nb, kb))
    return out + (qt.reshape(*lead, K, N),) if transposed else out


def _dense_gemm_setup(a_q, b_q, b_scale, out_dtype):
    """(M, N, K, B_SCALE_ROWS, c) for C = A . B^T: B_SCALE_ROWS is 128 when B has 128x128 block scales
    (NB, KB), 1 when it has 1x128 row scales (N, KB); c is the empty (M, N) output."""
    M, K = a_q.shape
    N = b_q.shape[0]
    b_rows = 128 if tuple(b_scale.shape) == (_ceil_div(N, 128), _ceil_div(K, 128)) else 1
    return M, N, K, b_rows, torch.empty((M, N), dtype=out_dtype, device=a_q.device)


def fp8_gemm_nt(a_q, a_scale, b_q, b_scale, out_dtype=torch.bfloat16, *, block_m=128, block_n=128,
                group_m=8, num_warps=8, num_stages=3, tma: bool | None = None):
    """C = A . B^T with A (M, K) 1x128-scaled and B (N, K) 128x128- or 1x128-scaled, FP32 promotion.

    On Hopper, with operands TMA can read (`use_tma`, `tma_gemm_ok`), this runs `fp8_gemm_nt_tma`
    (0.67-1.25x BF16 cuBLAS on the H200 at V3 shapes, against 0.45-0.89x for the kernel below).
    `tma`: see `use_tma`.
    """
    if use_tma(a_q, b_q, tma=tma) and tma_gemm_ok(a_q, b_q, out_dtype):
        return fp8_gemm_nt_tma(a_q, a_scale, b_q, b_scale, out_dtype)
    M, N, K, b_rows, c = _dense_gemm_setup(a_q, b_q, b_scale, out_dtype)
    if interpreting():
        block_m, block_n, num_warps, num_stages = 16, 16, 1, 1
    grid = (_ceil_div(M, block_m) * _ceil_div(N, block_n),)
    _fp8_gemm_nt_kernel[grid](a_q, b_q, c, a_scale, b_scale, M, N, K, a_q.stride(0), b_q.stride(0),
                              c.stride(0), a_scale.stride(0), a_scale.stride(1), b_scale.stride(0),
                              b_scale.stride(1), B_SCALE_ROWS=b_rows, BLOCK_M=block_m, BLOCK_N=block_n,
                              GROUP_M=group_m, UPCAST=interpreting(), num_warps=num_warps,
                              num_stages=num_stages)
    return c



_NUM_SMS: dict = {}


def _num_sms(device: torch.device) -> int:
    key = str(device)
    if key not in _NUM_SMS:
        _NUM_SMS[key] = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return _NUM_SMS[key]


def tma_gemm_ok(a_q: torch.Tensor, b_q: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """TMA needs 16-byte aligned row strides and base addresses: K % 16 == 0 and N * itemsize % 16 == 0."""
    K = a_q.shape[1]
    N = b_q.shape[0]
    item = torch.empty((), dtype=out_dtype).element_size()
    return (K % 16 == 0 and (N * item) % 16 == 0 and a_q.stride(1) == 1 and b_q.stride(1) == 1
            and a_q.stride(0) % 16 == 0 and b_q.stride(0) % 16 == 0
            and a_q.data_ptr() % 16 == 0 and b_q.data_ptr() % 16 == 0)


def fp8_gemm_nt_tma(a_q, a_scale, b_q, b_scale, out_dtype=torch.bfloat16, *, block_m=128, block_n=128,
                    group_m=8, num_warps=8, num_stages=4, persistent=True):
    """fp8_gemm_nt through TMA descriptors, as a persistent kernel (one program per SM).

    Same arguments and numbers as `fp8_gemm_nt` (FP32 promotion every 128 of K); needs
    `tma_gemm_ok` (K a multiple of 16, output rows 16-byte aligned). `persistent=False` launches
    one program per output tile instead.
    """
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, N, K, b_rows, c = _dense_gemm_setup(a_q, b_q, b_scale, out_dtype)
    if interpreting():
        block_m, block_n, num_warps, num_stages = 16, 16, 1, 1
    a_desc = TensorDescriptor.from_tensor(a_q, [block_m, 128])
    b_desc = TensorDescriptor.from_tensor(b_q, [block_n, 128])
    c_desc = TensorDescriptor.from_tensor(c, [block_m, block_n])
    tiles = _ceil_div(M, block_m) * _ceil_div(N, block_n)
    progs = min(tiles, _num_sms(a_q.device)) if persistent else tiles
    _fp8_gemm_nt_tma_kernel[(progs,)](a_desc, b_desc, c_desc, a_scale, b_scale, M, N, K,
                                      a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1),
                                      B_SCALE_ROWS=b_rows, BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=group_m,
                                      NUM_PROGS=progs, UPCAST=interpreting(),
                                      num_warps=num_warps, num_stages=num_stages)
    return c

# ----------------------------------------------------------------------------------------------
# Grouped GEMMs for routed experts ("grouped contiguous": tokens sorted by expert, offs = cumulative
# end rows, int32, torch._grouped_mm's convention). No host sync: the tile -> expert map is built on
# the device from offs, over an upper bound of the number of M tiles.

if HAVE_TRITON:

    @triton.jit
    def _fp8_grouped_gemm_nt_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, map_ptr, N, K, E, num_tiles,
                                    stride_am, stride_be, stride_bn, stride_cm, stride_asm, stride_ask,
                                    stride_bse, stride_bsn, stride_bsk,
                                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                                    UPCAST: tl.constexpr):
        # One program per (M tile of one expert, N tile). map_ptr: int32 (3, num_tiles) rows
        # (group, first row, end row); group == E marks rows past offs[-1] (written as zeros), a
        # tile past the last one has first row == end row (nothing loaded or stored).
        # neighbouring programs share B tiles (mostly one expert) in L2
        pid_m, pid_n = _swizzle(tl.program_id(0), num_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)
        e_c, row0, row1, real = _tile_of_expert(map_ptr, pid_m, num_tiles, E)
        e64 = e_c.to(tl.int64)
        kb_end = tl.where(real, tl.cdiv(K, 128), 0)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, 128)
        m_ok = offs_m < row1
        n_ok = offs_n < N
        offs_m64 = offs_m.to(tl.int64)
        a_ptrs = a_ptr + offs_m64[:, None] * stride_am + offs_k[None, :]
        b_ptrs = b_ptr + e64 * stride_be + offs_n[None, :] * stride_bn + offs_k[:, None]
        as_ptrs = as_ptr + offs_m64 * stride_asm
        bs_ptrs = bs_ptr + e64 * stride_bse + (offs_n // 128) * stride_bsn
        acc = _promoted_k_loop(a_ptrs, b_ptrs, as_ptrs, bs_ptrs, m_ok, n_ok, offs_k, K, kb_end,
                               stride_ask, stride_bsk, BLOCK_M, BLOCK_N, UPCAST)
        c = acc.to(c_ptr.dtype.element_ty)
        tl.store(c_ptr + offs_m64[:, None] * stride_cm + offs_n[None, :], c, mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _wgrad_tile(pstart_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # The grouped Wgrad's program -> (expert, its k-blocks [kb0, kb1) in the padded token layout,
        # output tile offsets, row/column indices and bounds). Grid: (output tiles, experts).
        pid = tl.program_id(0)
        e = tl.program_id(1)
        num_n = tl.cdiv(N, BLOCK_N)
        off_m = (pid // num_n) * BLOCK_M
        off_n = (pid % num_n) * BLOCK_N
        kb0 = (tl.load(pstart_ptr + e) // 128).to(tl.int32)  # int32: TMA descriptor coordinates
        kb1 = (tl.load(pstart_ptr + e + 1) // 128).to(tl.int32)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        return e, kb0, kb1, off_m, off_n, offs_m, offs_n, offs_m < M, offs_n < N

    @triton.jit
    def _store_expert_tile(c_ptr, e, stride_ce, stride_cm, offs_m, offs_n, m_ok, n_ok, acc):
        tl.store(c_ptr + e.to(tl.int64) * stride_ce + offs_m[:, None] * stride_cm + offs_n[None, :],
                 acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _fp8_grouped_wgrad_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, pstart_ptr, M, N,
                                  stride_am, stride_bn, stride_ce, stride_cm, stride_asm, stride_ask,
                                  stride_bsn, stride_bsk,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
        # C[e] (M, N) = A[:, tokens of e] . B[:, tokens of e]^T, both operands 1x128-scaled along the
        # tokens; every expert's token range starts on a 128 boundary (the padded layout), so its
        # k-blocks are pstart[e] // 128 .. pstart[e + 1] // 128. An expert without tokens gets zeros.
        e, kb0, kb1, off_m, off_n, offs_m, offs_n, m_ok, n_ok = _wgrad_tile(pstart_ptr, M, N, BLOCK_M, BLOCK_N)
        offs_k = tl.arange(0, 128)
        a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + (kb0 * 128 + offs_k)[None, :]
        b_ptrs = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + (kb0 * 128 + offs_k)[:, None]
        as_ptrs = as_ptr + offs_m * stride_asm
        bs_ptrs = bs_ptr + offs_n * stride_bsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kb in range(kb0, kb1):
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            part = tl.dot(a, b, out_dtype=tl.float32)
            sa = tl.load(as_ptrs + kb * stride_ask, mask=m_ok, other=0.0)
            sb = tl.load(bs_ptrs + kb * stride_bsk, mask=n_ok, other=0.0)
            acc += part * sa[:, None] * sb[None, :]
            a_ptrs += 128
            b_ptrs += 128
        _store_expert_tile(c_ptr, e, stride_ce, stride_cm, offs_m, offs_n, m_ok, n_ok, acc)


    @triton.jit
    def _fp8_grouped_gemm_nt_tma_kernel(a_desc, b_desc, c_ptr, as_ptr, bs_ptr, map_ptr, N, K, E, num_tiles,
                                        stride_cm, stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,
                                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                                        UPCAST: tl.constexpr):
        # _fp8_grouped_gemm_nt_kernel with TMA loads: A rows row0.. (rows past the expert's end are
        # loaded but masked at the store), B from the (E * N, K) view at row e * N + n (rows past N
        # belong to the next expert and land in masked columns). No masks in the k-loop.
        pid_m, pid_n = _swizzle(tl.program_id(0), num_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)
        e_c, row0, row1, real = _tile_of_expert(map_ptr, pid_m, num_tiles, E)
        kb_end = tl.where(real & (row1 > row0), tl.cdiv(K, 128), 0)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        off_n = pid_n * BLOCK_N
        offs_n = off_n + tl.arange(0, BLOCK_N)
        m_ok = offs_m < row1
        n_ok = offs_n < N
        bs_base = bs_ptr + e_c.to(tl.int64) * stride_bse
        if BLOCK_N == 128:  # tiles sit on 128x128 blocks: one B scale per tile and k-block
            bs_ptrs = bs_base + pid_n * stride_bsn
        else:
            bs_ptrs = bs_base + (offs_n // 128) * stride_bsn
        acc = _promoted_k_loop_tma(a_desc, b_desc, row0, e_c * N + off_n, 0, kb_end,
                                   as_ptr + offs_m.to(tl.int64) * stride_asm, m_ok, stride_ask, bs_ptrs, n_ok,
                                   stride_bsk, BLOCK_N == 128, BLOCK_M, BLOCK_N, UPCAST)
        c = acc.to(c_ptr.dtype.element_ty)
        tl.store(c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :], c,
                 mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _fp8_grouped_wgrad_tma_kernel(a_desc, b_desc, c_ptr, as_ptr, bs_ptr, pstart_ptr, M, N,
                                      stride_ce, stride_cm, stride_asm, stride_ask, stride_bsn, stride_bsk,
                                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
        # _fp8_grouped_wgrad_kernel with TMA loads (A (M, Tp) and B (N, Tp), both 1x128 along Tp).
        e, kb0, kb1, off_m, off_n, offs_m, offs_n, m_ok, n_ok = _wgrad_tile(pstart_ptr, M, N, BLOCK_M, BLOCK_N)
        acc = _promoted_k_loop_tma(a_desc, b_desc, off_m, off_n, kb0, kb1, as_ptr + offs_m * stride_asm, m_ok,
                                   stride_ask, bs_ptr + offs_n * stride_bsn, n_ok, stride_bsk, False, BLOCK_M,
                                   BLOCK_N, UPCAST)
        _store_expert_tile(c_ptr, e, stride_ce, stride_cm, offs_m, offs_n, m_ok, n_ok, acc)

def grouped_tile_map(offs: torch.Tensor, T: int, block_m: int) -> torch.Tensor:
    """int32 (3, n_tiles): for each M tile of the grouped layout, (group, first row, end row).

    Groups are the E experts (rows offs[e-1]..offs[e]) and a group E for rows offs[-1]..T, which the
    kernel writes as zeros. n_tiles = ceil(T / block_m) + E + 1 bounds the real count (each group
    adds at most one partial tile); the spare tiles have first row == end row. Device ops only.
    """
    E = offs.numel()
    dev = offs.device
    ends = torch.cat([offs.to(torch.int64).clamp(0, T), torch.full((1,), T, dtype=torch.int64, device=dev)])
    starts = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), ends[:-1]])
    counts = (ends - starts).clamp(min=0)
    tiles = (counts + block_m - 1) // block_m
    cum = tiles.cumsum(0)
    n_tiles = _ceil_div(T, block_m) + E + 1
    idx = torch.arange(n_tiles, dtype=torch.int64, device=dev)
    g = torch.searchsorted(cum, idx, right=True)
    valid = g <= E
    gc = g.clamp(max=E)
    row0 = starts[gc] + (idx - (cum[gc] - tiles[gc])) * block_m
    row1 = ends[gc]
    row0 = torch.where(valid, row0, 0)
    row1 = torch.where(valid, row1, 0)
    return torch.stack([gc, row0, row1]).to(torch.int32).contiguous()


def _grouped_config(block_m, block_n, num_warps, num_stages):
    if interpreting():
        return 16, 16, 1, 1
    return block_m, block_n, num_warps, num_stages


def use_tma(*operands: torch.Tensor, tma: bool | None = None) -> bool:
    """Whether the TMA kernels run: tma=None decides (CUDA with compute capability >= 9, every operand
    contiguous with 16-byte rows and base); True forces them (the interpreter runs them too), False the
    pointer-based kernels (what a recipe with `tma=False` passes)."""
    if tma is not None:
        return tma
    if interpreting():
        return False
    t0 = operands[0]
    if not t0.is_cuda or cuda_kernels.capability(t0.device)[0] < 9:
        return False
    return all(t.is_contiguous() and (t.shape[-1] * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in operands)


def fp8_grouped_gemm_nt(a_q, a_scale, b_q, b_scale, offs, out_dtype=torch.bfloat16, *, tile_map=None,
                        block_m=128, block_n=128, group_m=8, num_warps=8, num_stages=4, tma: bool | None = None):
    """out[rows of e] = a[rows of e] . b[e]^T for all experts in one launch, FP32 promotion per 128 of K.

    a_q (T, K) E4M3, a_scale (T, ceil(K/128)) float32 (1x128 tiles, any strides); b_q (E, N, K) E4M3
    (K contiguous), b_scale (E, ceil(N/128), ceil(K/128)) float32 (128x128 blocks, any strides);
    offs (E,) int32 cumulative end rows on a_q's device. Rows past offs[-1] come back as zeros.
    Same numbers as `fp8_gemm_reference` per expert. `tile_map`: a `grouped_tile_map(offs, T, block_m)`
    to reuse (it must be built with this call's block_m; under the interpreter block_m is 16).
    `tma`: see `use_tma` (the TMA kernel loads operand tiles through tensor descriptors, Hopper on).
    """
    T, K = a_q.shape
    if b_q.dim() != 3 or b_q.shape[2] != K:
        raise ValueError(f"fp8_grouped_gemm_nt wants a (T, K) and b (E, N, K); got {tuple(a_q.shape)} and "
                         f"{tuple(b_q.shape)}")
    E, N, _ = b_q.shape
    kb = _ceil_div(K, 128)
    if tuple(a_scale.shape) != (T, kb):
        raise ValueError(f"a_scale has shape {tuple(a_scale.shape)}; expected ({T}, {kb}) (1x128 tiles)")
    if tuple(b_scale.shape) != (E, _ceil_div(N, 128), kb):
        raise ValueError(f"b_scale has shape {tuple(b_scale.shape)}; expected ({E}, {_ceil_div(N, 128)}, {kb}) "
                         "(128x128 blocks per expert)")
    if tuple(offs.shape) != (E,):
        raise ValueError(f"offs has shape {tuple(offs.shape)}; expected ({E},) cumulative end rows")
    if a_q.stride(1) != 1:
        a_q = a_q.contiguous()
    if b_q.stride(2) != 1:
        b_q = b_q.contiguous()
    c = torch.empty((T, N), dtype=out_dtype, device=a_q.device)
    if T == 0 or N == 0:
        return c
    if K == 0 or E == 0:
        return c.zero_()
    block_m, block_n, num_warps, num_stages = _grouped_config(block_m, block_n, num_warps, num_stages)
    if tile_map is None:
        tile_map = grouped_tile_map(offs, T, block_m)
    n_tiles = tile_map.shape[1]
    grid = (n_tiles * _ceil_div(N, block_n),)
    if use_tma(a_q, b_q, tma=tma):
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_desc = TensorDescriptor.from_tensor(a_q, [block_m, 128])
        b_desc = TensorDescriptor.from_tensor(b_q.reshape(E * N, K), [block_n, 128])
        _fp8_grouped_gemm_nt_tma_kernel[grid](a_desc, b_desc, c, a_scale, b_scale, tile_map, N, K, E, n_tiles,
                                              c.stride(0), a_scale.stride(0), a_scale.stride(1), b_scale.stride(0),
                                              b_scale.stride(1), b_scale.stride(2), BLOCK_M=block_m,
                                              BLOCK_N=block_n, GROUP_M=group_m, UPCAST=interpreting(),
                                              num_warps=num_warps, num_stages=num_stages)
        return c
    _fp8_grouped_gemm_nt_kernel[grid](a_q, b_q, c, a_scale, b_scale, tile_map, N, K, E, n_tiles,
                                      a_q.stride(0), b_q.stride(0), b_q.stride(1), c.stride(0),
                                      a_scale.stride(0), a_scale.stride(1), b_scale.stride(0),
                                      b_scale.stride(1), b_scale.stride(2),
                                      BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=group_m, UPCAST=interpreting(),
                                      num_warps=num_warps, num_stages=num_stages)
    return c


if HAVE_TRITON:

    @triton.jit
    def _zero_rows_past_kernel(c_ptr, offs_ptr, E, T, N, stride_c, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        end = tl.load(offs_ptr + E - 1).to(tl.int64)
        r0 = tl.program_id(0).to(tl.int64) * BLOCK_R
        if r0 + BLOCK_R > end:  # only the blocks that reach past the last expert's rows store
            rows = r0 + tl.arange(0, BLOCK_R)
            cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
            mask = ((rows >= end) & (rows < T))[:, None] & (cols < N)[None, :]
            tl.store(c_ptr + rows[:, None] * stride_c + cols[None, :],
                     tl.zeros((BLOCK_R, BLOCK_C), c_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _group_scales_kernel(s_ptr, offs_ptr, out_ptr, sizes_ptr, T, KB, E, stride_st, stride_skb,
                             BLOCK_T: tl.constexpr, STEPS: tl.constexpr):
        # Row t of expert e (e = E: the rows past offs[-1]) moves its KB scales to
        # out[KB * start_e + kb * size_e + (t - start_e)]. Program 0 also writes sizes (E,) int64.
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        ok = t < T
        lo = tl.zeros((BLOCK_T,), tl.int32)
        hi = tl.full((BLOCK_T,), E, tl.int32)
        for _ in tl.static_range(STEPS):  # first e in [0, E] whose end (offs[e], or T for e = E) is > t
            mid = (lo + hi) // 2
            end = tl.where(mid < E, tl.load(offs_ptr + tl.minimum(mid, E - 1)), T)
            right = end <= t
            lo = tl.where(right, mid + 1, lo)
            hi = tl.where(right, hi, mid)
        e = lo
        start = tl.where(e > 0, tl.load(offs_ptr + tl.maximum(e - 1, 0)), 0).to(tl.int64)
        end = tl.where(e < E, tl.load(offs_ptr + tl.minimum(e, E - 1)), T).to(tl.int64)
        base = KB * start + (t - start)
        for kb in range(KB):
            v = tl.load(s_ptr + t.to(tl.int64) * stride_st + kb * stride_skb, mask=ok)
            tl.store(out_ptr + base + kb * (end - start), v, mask=ok)
        if tl.program_id(0) == 0:
            for g in range(E):
                prev = tl.where(g > 0, tl.load(offs_ptr + tl.maximum(g - 1, 0)), 0)
                tl.store(sizes_ptr + g, (tl.load(offs_ptr + g) - prev).to(tl.int64))


def group_scales(a_scale: torch.Tensor, offs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, KB) 1x128 scales (any strides) -> (flat (T * KB,) buffer with expert e's scales as a (KB, M_e)
    block at KB * start_e, M_e contiguous, the rows past offs[-1] as one more block; sizes (E,) int64).
    One launch, no host sync; reference `moeco.fp8.fbgemm.group_scales_reference`."""
    T, KB = a_scale.shape
    E = offs.numel()
    out = torch.empty(T * KB, dtype=torch.float32, device=a_scale.device)
    sizes = torch.empty(E, dtype=torch.int64, device=a_scale.device)
    if E == 0:  # every row is past offs[-1]: one (KB, T) block
        return a_scale.t().reshape(-1).float().clone(), sizes
    if offs.dtype != torch.int32:
        offs = offs.to(torch.int32)
    block_t = 16 if interpreting() else 256
    steps = max(1, E.bit_length())  # halvings of the E + 1 candidates [0, E] down to one
    _group_scales_kernel[(max(1, _ceil_div(T, block_t)),)](a_scale, offs, out, sizes, T, KB, E, a_scale.stride(0),
                                                            a_scale.stride(1), BLOCK_T=block_t, STEPS=steps)
    return out, sizes


def zero_rows_past(c: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """c[offs[-1]:] = 0 in place, for c (T, N) with unit column stride, without a host sync."""
    T, N = c.shape
    E = offs.numel()
    if T == 0 or N == 0 or E == 0:
        return c
    block_r, block_c = (16, 64) if interpreting() else (64, 1024)
    _zero_rows_past_kernel[(_ceil_div(T, block_r), _ceil_div(N, block_c))](
        c, offs, E, T, N, c.stride(0), BLOCK_R=block_r, BLOCK_C=block_c)
    return c


def grouped_padded_rows(offs: torch.Tensor, T: int):
    """Each expert's rows moved to start on a multiple of 128: (dest (T,) int64, pstart (E+1,) int64, Tp).

    Row t of expert e goes to row t - start[e] + pstart[e] of a (Tp, C) buffer; pstart[E] is the used
    length; Tp = 128 * (ceil(T / 128) + E) bounds it without a host sync. Rows past offs[-1] are
    sent to row Tp - 1 of a spare block past pstart[E] (never read). Device ops only.
    """
    E = offs.numel()
    dev = offs.device
    ends = offs.to(torch.int64).clamp(0, T)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), ends[:-1]])
    counts = (ends - starts).clamp(min=0)
    padded = (counts + 127) // 128 * 128
    pstart = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), padded.cumsum(0)])
    Tp = 128 * (_ceil_div(T, 128) + E + 1)
    t = torch.arange(T, dtype=torch.int64, device=dev)
    e = torch.searchsorted(ends, t, right=True)
    inside = e < E
    ec = e.clamp(max=max(E - 1, 0))
    dest = torch.where(inside, t - starts[ec] + pstart[ec], Tp - 1)
    return dest, pstart, Tp


def grouped_wgrad_gemm(gq, gs, xtq, xts, pstart, E: int, *, out_dtype=torch.float32, block_m=128, block_n=128,
                       num_warps=8, num_stages=4, tma: bool | None = None, gemm: str = "wgmma"):
    """(E, N, K): out[e] = the sum over expert e's 128-token blocks (pstart[e] .. pstart[e + 1]) of the
    promoted products of `grouped_wgrad.grouped_wgrad_operands`' tiles. `gemm="wgmma"`: moeco's Hopper
    kernel (`cuda_gemm.fp8_grouped_wgrad_nt`, persistent TMA + WGMMA over all experts' tiles; fp32 out, N
    a multiple of 128) wherever it applies, `"triton"`: this module's kernel (grid: output tiles x
    experts; a recipe with gemm_kernel="cublas" takes it). Triton's kernel runs wherever the wgmma one
    cannot."""
    N, K = gq.shape[0], xtq.shape[0]
    if gemm == "wgmma" and out_dtype == torch.float32 and not interpreting():
        if cuda_gemm.grouped_supported(gq, gs, xtq, xts):
            c = cuda_gemm.fp8_grouped_wgrad_nt(gq, gs, xtq, xts, pstart, E)
            if c is not None:
                return c
    c = torch.empty((E, N, K), dtype=out_dtype, device=gq.device)
    block_m, block_n, num_warps, num_stages = _grouped_config(block_m, block_n, num_warps, num_stages)
    grid = (_ceil_div(N, block_m) * _ceil_div(K, block_n), E)
    if use_tma(gq, xtq, tma=tma):
        from triton.tools.tensor_descriptor import TensorDescriptor

        a_desc = TensorDescriptor.from_tensor(gq, [block_m, 128])
        b_desc = TensorDescriptor.from_tensor(xtq, [block_n, 128])
        _fp8_grouped_wgrad_tma_kernel[grid](a_desc, b_desc, c, gs, xts, pstart, N, K, c.stride(0), c.stride(1),
                                            gs.stride(0), gs.stride(1), xts.stride(0), xts.stride(1),
                                            BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=interpreting(),
                                            num_warps=num_warps, num_stages=num_stages)
        return c
    _fp8_grouped_wgrad_kernel[grid](gq, xtq, c, gs, xts, pstart, N, K, gq.stride(0), xtq.stride(0),
                                    c.stride(0), c.stride(1), gs.stride(0), gs.stride(1), xts.stride(0),
                                    xts.stride(1), BLOCK_M=block_m, BLOCK_N=block_n, UPCAST=interpreting(),
                                    num_warps=num_warps, num_stages=num_stages)
    return c
