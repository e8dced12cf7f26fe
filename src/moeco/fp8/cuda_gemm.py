"""DeepSeek-V3's block-scaled FP8 GEMM as a Hopper kernel: TMA loads, WGMMA, promotion in registers.

    C (M, N) = sum over k-blocks kb of (A_kb . B_kb^T) * a_scale[:, kb] * b_scale[n // 128, kb]

A (M, K) E4M3 with 1x128 scales, B (N, K) E4M3 with 128x128 block scales, C bf16 or fp32: the
Fprop and Dgrad of `Fp8Linear` (moeco.fp8.gemm's module docstring has the layouts).

The kernel (CUDA C, compiled at first use with NVRTC for sm_90a; `wgmma` needs the "a" target):
    - persistent: one 384-thread block per multiprocessor walks 128 x BN output tiles, tile ids
      grouped 8 m-tiles at a time so that concurrent tiles share A and B in L2;
    - warp group 0 is the producer: one thread issues TMA copies of the 128 x 128 A tile and the
      BN x 128 B tile of each k-block into a ring of 4 shared-memory stages (128-byte swizzle,
      the layout WGMMA reads), with an mbarrier per stage for "full" and one for "empty";
    - warp groups 1 and 2 each own 64 rows of the tile: per k-block, four m64nBNk32 WGMMAs into a
      fresh FP32 accumulator (the Tensor Cores' limited-precision sum over 128 of K), then the
      promotion: out += acc * (a_scale[row] * b_scale), in FP32 on the CUDA cores. Two accumulators
      take turns: k-block kb + 1's WGMMAs are issued before kb is promoted, so the Tensor Cores keep
      working through the promotion (with one accumulator the kernel ran at Triton's speed);
    - the producer gives its registers to the math warp groups (`setmaxnreg`);
    - epilogue: each math warp group rounds its 64 x BN sums into shared memory (128-byte swizzle,
      no bank conflicts) and one thread stores them with TMA, which clips the edges and overlaps the
      store with the warp group's next tile.

Measured on the H200 (BENCHMARKS.md, eighth and ninth sessions): 927-1166 TFLOP/s at DeepSeek-V3's
shapes where N % 128 == 0, 1.36-1.61x BF16 and 0.85-0.99x cuBLAS's block-scaled `_scaled_mm`; at N = 576
(192-wide tiles) 1.2-1.4x faster than cuBLAS, which has to pad N to 640. Its bf16 outputs equal cuBLAS's
bit for bit. The GPU runs all of these at its 700 W power limit (SM clock ~1400-1750 MHz).

This is the structure of DeepSeek's DeepGEMM (the promotion of the V3 report's section 3.3, N_C = 128); the code is
moeco's own. The TMA descriptors are encoded on the host with the driver's
`cuTensorMapEncodeTiled` and passed by value (`__grid_constant__`), so the launch goes through
`cuLaunchKernel` here rather than PyTorch's `_CudaKernel`, which passes only tensors and numbers.

Variants (compile-time, each compiled on first use):
    - B with one scale per row (Wgrad's 128x1 tiles, b_scale (N, KB)): the stage also brings the
      tile's BN column scales in by TMA and the promotion multiplies each column by its own. Measured
      0.69-0.97x cuBLAS's speed for Wgrad, so `auto` keeps cuBLAS there.
    - `bm=256`: 256-row tiles; each math warp group owns 128 rows as two 64-row halves that share one
      accumulator (the registers hold one accumulator and two sums), and the two warp groups issue
      their WGMMA groups in turn (named barriers) so that one promotes while the other's group runs.
      A quarter fewer bytes per FLOP from L2; measured -4% to +6% against 128-row tiles on most V3
      shapes and 12-21% slower where the tile count leaves the last wave mostly empty, never clearly
      ahead of cuBLAS, so not used by `auto` (BENCHMARKS.md, ninth session). Same bits as bm=128.
    - `bn=192`: 192-wide tiles, one accumulator per math warp group (96 registers, and 96 for the sum),
      the WGMMA groups issued in turn as for bm=256; a tile spans two of B's 128-row scale blocks, so
      the promotion picks each column's factor. The default where N % 192 == 0 but N % 128 != 0 (MLA's
      N = 576: 1.09x / 1.43x BF16 at 4096 / 16384 tokens against 0.87x / 1.31x with 128-wide tiles);
      0.84-0.98x the 128-wide tiles elsewhere (`tile_width`).
    - `grouped` (`fp8_grouped_wgrad_nt`): the routed experts' Wgrad in one launch. The per-row form over
      E experts that share the token dimension: expert e reduces over its own 128-token blocks (each
      expert's tokens start on a 128-token boundary, `triton_kernels.grouped_wgrad_operands`), read
      from a device array, so no host sync; work units are (expert, output tile), the output is
      (E M, N) rows. On the H200 the GEMM alone ran 1.16-1.52x Triton's grouped kernel and 1.02-1.16x
      BF16 `_grouped_mm` (BENCHMARKS.md, eleventh session), so it is the default on Hopper.
    - `cluster=2`: two CTAs side by side in M; each loads half of the B tile and multicasts it to
      both, and releases a stage in both. Level with one CTA on the H200 (the kernel is not L2-bound),
      so not the default. Its remote arrive must stay `.release.cta`: `.release.cluster` costs a
      GPU-wide MEMBAR per k-block and halved the speed.

What it takes (`supported`): Hopper (sm_90), K a multiple of 16 (TMA's 16-byte row stride),
contiguous K-major operands with 16-byte aligned bases, N a multiple of 8, B scaled per 128x128 block
or per row. Anything else goes to cuBLAS / Triton through `moeco.fp8.gemm.fp8_gemm`.
"""

from __future__ import annotations

import ctypes
import os

import torch

from moeco.errors import ConfigError
from moeco.fp8 import cuda_kernels

FP8_DTYPE = torch.float8_e4m3fn
BK = 128
_THREADS = 384


def _wgmma_asm(bn: int) -> str:
    """The inline-asm call of one m64n{bn}k32 E4M3 WGMMA accumulating into d[0 .. bn/2)."""
    n = bn // 2
    regs = ", ".join(f"%{i}" for i in range(n))
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(n))
    return (
        f'asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{n + 2}, 0;\\n"\n'
        f'    "wgmma.mma_async.sync.aligned.m64n{bn}k32.f32.e4m3.e4m3 {{{regs}}}, %{n}, %{n + 1}, p, 1, 1;\\n}}\\n"\n'
        f'    : {outs}\n'
        f'    : "l"(da), "l"(db), "r"(accumulate));'
    )


_SOURCE = r"""
typedef unsigned long long u64;
typedef unsigned int u32;

struct __align__(64) TmaDesc { u64 word[16]; };

#define BK 128
#ifndef GROUPED
#define GROUPED 0
#endif
#define NACC (BN / 2)
#define A_BYTES (BM * BK)
#define B_BYTES (BN * BK)
#define STAGE_BYTES (A_BYTES + B_BYTES)
#define GROUP_M (8 / CLUSTER)  // in units of CLUSTER m-tiles
#if OUT_F32
#define OUT_BYTES 4
#else
#define OUT_BYTES 2
#endif
#define SUB_COLS (128 / OUT_BYTES)              // output columns per 128-byte swizzled row
#define C_HALF_BYTES (64 * BN * OUT_BYTES)      // one math warp group's 64 rows of the output tile
#define SINGLE_ACC (BM == 256 || BN > 128)      // one accumulator per math warp group, groups issued in turn
#define HALVES (BM / 128)                       // 64-row halves per math warp group
#if ROWWISE
#define SB_STAGE_BYTES (BN * 4)
#else
#define SB_STAGE_BYTES 0
#endif

__device__ __forceinline__ u32 smem_addr(const void *p) { return (u32)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void bar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count));
}
__device__ __forceinline__ void bar_expect(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void bar_wait(u32 bar, u32 parity) {
    u32 done = 0;
    while (!done) {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(bar), "r"(parity) : "memory");
    }
}
__device__ __forceinline__ void tma_load(u32 dst, const TmaDesc *desc, u32 bar, int c0, int c1) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];"
                 :: "r"(dst), "l"((u64)desc), "r"(bar), "r"(c0), "r"(c1) : "memory");
}

// The same box multicast to the CTAs of the cluster in `mask`, at the same shared-memory offsets,
// each completing its own CTA's barrier at `bar`'s offset.
__device__ __forceinline__ void tma_load_multicast(u32 dst, const TmaDesc *desc, u32 bar, int c0, int c1, unsigned short mask) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%3, %4}], [%2], %5;"
                 :: "r"(dst), "l"((u64)desc), "r"(bar), "r"(c0), "r"(c1), "h"(mask) : "memory");
}
// Arrive on the barrier at the same offset in CTA `peer`. Default semantics (.release.cta) on purpose:
// `.release.cluster` compiles to MEMBAR.ALL.GPU before the arrive and halved the kernel's speed.
__device__ __forceinline__ void bar_arrive_peer(u32 bar, u32 peer) {
    asm volatile("{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, %0, %1;\n"
                 "mbarrier.arrive.shared::cluster.b64 _, [ra];\n}" :: "r"(bar), "r"(peer) : "memory");
}
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ u32 cluster_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

// WGMMA shared-memory descriptor of a K-major tile with 128-byte swizzle: rows of 128 bytes, atoms of
// 8 rows (1024 bytes, the stride between 8-row groups); the tile starts 1024-byte aligned.
__device__ __forceinline__ u64 smem_desc(u32 addr) {
    return (u64)((addr & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}

__device__ __forceinline__ void wgmma_fma(float *d, u64 da, u64 db, int accumulate) {
WGMMA_ASM
}

__device__ __forceinline__ void keep(float &r) { asm volatile("" : "+f"(r) :: "memory"); }

// Wait for k-block `it`'s operands and start its four WGMMAs (K = 4 x 32) into acc.
__device__ __forceinline__ void issue(float (&acc)[NACC], u32 base, u32 bars, int it, u32 a_off) {
    const int stage = it % STAGES;
    bar_wait(bars + 8 * stage, (it / STAGES) & 1);
    const u32 tile = base + stage * STAGE_BYTES;
    const u64 da = smem_desc(tile + a_off), db = smem_desc(tile + A_BYTES);
#pragma unroll
    for (int i = 0; i < NACC; ++i) keep(acc[i]);
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
#pragma unroll
    for (int k = 0; k < BK / 32; ++k) wgmma_fma(acc, da + 2 * k, db + 2 * k, k);  // +32 bytes of K
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wait_one() { asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory"); }
__device__ __forceinline__ void wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }

// The promotion factors of k-block kb for this thread's two rows: a_scale[row, kb] * b_scale[n-block, kb].
__device__ __forceinline__ void scales(const float *sa0, const float *sa1, const float *sb_col, int sa_k, int sb_k,
                                       int kb, float &f0, float &f1) {
#if ROWWISE
    const float f = 1.0f;  // B's per-row scales come in with the stage
#else
    const float f = __ldg(sb_col + (long long)kb * sb_k);
#endif
    f0 = __ldg(sa0 + (long long)kb * sa_k) * f;
    f1 = __ldg(sa1 + (long long)kb * sa_k) * f;
}

// Free k-block `it`'s stage (its WGMMA group has completed): one arrival per math warp.
__device__ __forceinline__ void release(u32 bars, int it) {
    if ((threadIdx.x & 31) == 0) {
        bar_arrive(bars + 8 * (STAGES + it % STAGES));
#if CLUSTER == 2
        bar_arrive_peer(bars + 8 * (STAGES + it % STAGES), cluster_rank() ^ 1);  // its producer wrote half our B
#endif
    }
}
// The promotion proper: sum += acc x (f0 for the thread's first row, f1 for its second), where the
// tile's columns from `split` on (a multiple of 8) belong to B's next scale block and take g0 / g1.
// Element i is in row r + 8 ((i / 2) % 2), column 8 (i / 4) + 2 (lane % 4) + (i % 2).
__device__ __forceinline__ void fold2(float (&acc)[NACC], float (&sum)[NACC], float f0, float f1, float g0, float g1,
                                      int split) {
#pragma unroll
    for (int i = 0; i < NACC; ++i) keep(acc[i]);
#pragma unroll
    for (int i = 0; i < NACC; i += 4) {
        const bool second = 8 * (i / 4) >= split;
        const float e0 = second ? g0 : f0, e1 = second ? g1 : f1;
        sum[i] = __fmaf_rn(acc[i], e0, sum[i]);
        sum[i + 1] = __fmaf_rn(acc[i + 1], e0, sum[i + 1]);
        sum[i + 2] = __fmaf_rn(acc[i + 2], e1, sum[i + 2]);
        sum[i + 3] = __fmaf_rn(acc[i + 3], e1, sum[i + 3]);
    }
}
// fold2 for a tile within one of B's scale blocks. Written out rather than as fold2(..., split = BN):
// ptxas schedules that form differently (3 more instructions in the measured 128 x 128 kernel).
__device__ __forceinline__ void fold(float (&acc)[NACC], float (&sum)[NACC], float f0, float f1) {
#pragma unroll
    for (int i = 0; i < NACC; ++i) keep(acc[i]);
#pragma unroll
    for (int i = 0; i < NACC; ++i) sum[i] = __fmaf_rn(acc[i], (i & 2) ? f1 : f0, sum[i]);
}

// k-block `it` is done: free its stage and add acc x its factors to sum. ROWWISE: B has one scale per
// row (Wgrad's 128x1 tiles), staged in shared memory per k-block at sb_tile; f0, f1 are then A's
// scales alone and each column multiplies in its own; the stage is freed after its scales are read.
__device__ __forceinline__ void promote(float (&acc)[NACC], float (&sum)[NACC], float f0, float f1, u32 bars, int it,
                                        u32 sb_tile) {
#pragma unroll
    for (int i = 0; i < NACC; ++i) keep(acc[i]);
#if ROWWISE
    const u32 col = sb_tile + 8 * (threadIdx.x & 3);  // this thread's columns 8 j + 2 (lane % 4) + {0, 1}
#pragma unroll
    for (int j = 0; j < NACC / 4; ++j) {
        float bx, by;
        asm volatile("ld.shared.v2.f32 {%0, %1}, [%2];" : "=f"(bx), "=f"(by) : "r"(col + 32 * j));
        sum[4 * j + 0] = __fmaf_rn(acc[4 * j + 0], f0 * bx, sum[4 * j + 0]);
        sum[4 * j + 1] = __fmaf_rn(acc[4 * j + 1], f0 * by, sum[4 * j + 1]);
        sum[4 * j + 2] = __fmaf_rn(acc[4 * j + 2], f1 * bx, sum[4 * j + 2]);
        sum[4 * j + 3] = __fmaf_rn(acc[4 * j + 3], f1 * by, sum[4 * j + 3]);
    }
    // The scales were read through the generic proxy and the stage's next TMA load writes them
    // through the async proxy: without this fence that write could land before the reads (seen on
    // the H200: about 1 call in 1500 with bn=64 gave other bits; none in 3000 with the fence).
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    release(bars, it);
#else
    release(bars, it);
    fold(acc, sum, f0, f1);
#endif
}

// Epilogue of 64 rows x BN: this warp group's sums, rounded, into shared memory as SUB_COLS-wide column
// slabs with the 128-byte swizzle (conflict-free: a store instruction's 8 rows land in 8 different 16-byte
// chunks), then one TMA store per slab, which clips rows past M and columns past N and runs while the
// warp group goes on. `my_c` is the warp group's buffer; its previous store must have read it first.
__device__ __forceinline__ void store_rows(const float (&sum)[NACC], u32 my_c, const TmaDesc *c_desc, int row, int col,
                                           int wg, int t) {
    const int warp = t / 32, lane = t % 32;
    if (t == 0) asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");  // the last store has read it
    asm volatile("bar.sync %0, 128;" :: "r"(wg) : "memory");
#pragma unroll
    for (int i = 0; i < NACC; i += 2) {  // element i: row 16 warp + lane / 4 + 8 ((i >> 1) & 1), column 8 (i >> 2) + 2 (lane % 4)
        const int r = warp * 16 + lane / 4 + 8 * ((i >> 1) & 1), c = 8 * (i >> 2) + 2 * (lane % 4);
        const int byte = (c % SUB_COLS) * OUT_BYTES;
        const u32 addr = my_c + (c / SUB_COLS) * (64 * 128) + r * 128 + ((((byte >> 4) ^ (r & 7))) << 4) + (byte & 15);
#if OUT_F32
        asm volatile("st.shared.v2.f32 [%0], {%1, %2};" :: "r"(addr), "f"(sum[i]), "f"(sum[i + 1]) : "memory");
#else
        u32 packed;  // cvt puts its first source in the upper half: column c + 1
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(packed) : "f"(sum[i + 1]), "f"(sum[i]));
        asm volatile("st.shared.u32 [%0], %1;" :: "r"(addr), "r"(packed) : "memory");
#endif
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");  // visible to the TMA unit
    asm volatile("bar.sync %0, 128;" :: "r"(wg) : "memory");
    if (t == 0) {
#pragma unroll
        for (int j = 0; j < BN / SUB_COLS; ++j)
            asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];"
                         :: "l"((u64)c_desc), "r"(col + j * SUB_COLS), "r"(row), "r"(my_c + j * (64 * 128))
                         : "memory");
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
    }
}

// SINGLE_ACC: the two math warp groups issue their WGMMA groups in turn (named barriers 3 and 4), so the
// Tensor Cores run them one after the other and each warp group promotes while the other's group runs.
__device__ __forceinline__ void turn_wait(int wg) {
    asm volatile("bar.sync %0, 256;" :: "r"(wg == 1 ? 3 : 4) : "memory");
}
__device__ __forceinline__ void turn_pass(int wg) {
    asm volatile("bar.arrive %0, 256;" :: "r"(wg == 1 ? 4 : 3) : "memory");
}

__device__ __forceinline__ void tile_coords(int tile, int tiles_m, int tiles_n, int &tm, int &tn) {
    const int per_group = GROUP_M * tiles_n;
    const int group = tile / per_group;
    const int first_m = group * GROUP_M;
    const int rows = min(tiles_m - first_m, GROUP_M);
    const int in_group = tile - group * per_group;
    tm = first_m + in_group % rows;
    tn = in_group / rows;
}

// A work unit's place: `u` its index among its expert's units, `e` the expert and [kb_lo, kb_hi) its
// k-blocks. Dense: one expert and all of K. GROUPED (the experts' Wgrad): E experts share the reduction
// dimension, expert e owning the 128-token blocks kstart[e] / 128 .. kstart[e + 1] / 128 (each expert's
// tokens start on a 128-token boundary), and its output is rows e M .. e M + M - 1 of C (E M, N).
__device__ __forceinline__ void unit_place(int unit, int per_e, const long long *kstart, int KB, int &u, int &e,
                                           int &kb_lo, int &kb_hi) {
#if GROUPED
    e = unit / per_e;
    u = unit - e * per_e;
    kb_lo = (int)(kstart[e] / BK);
    kb_hi = (int)(kstart[e + 1] / BK);
#else
    (void)per_e; (void)kstart;
    e = 0;
    u = unit;
    kb_lo = 0;
    kb_hi = KB;
#endif
}

extern "C" __global__ void __launch_bounds__(384, 1) KNAME(
    const __grid_constant__ TmaDesc a_desc, const __grid_constant__ TmaDesc b_desc,
    const __grid_constant__ TmaDesc c_desc, const __grid_constant__ TmaDesc s_desc,
    const float *__restrict__ sa, const float *__restrict__ sb, void *__restrict__ out,
    int M, int N, int K, int sa_m, int sa_k, int sb_n, int sb_k, const long long *__restrict__ kstart, int E) {
    extern __shared__ unsigned char smem_raw[];
    const u32 base = (smem_addr(smem_raw) + 1023) & ~1023u;
    const u32 c_smem = base + STAGES * STAGE_BYTES;  // the output tile, 64 rows per math warp group
    const u32 sb_smem = c_smem + 2 * C_HALF_BYTES;  // ROWWISE: B's BN row scales of each stage
    const u32 bars = sb_smem + SB_STAGE_BYTES * STAGES;  // full[STAGES], then empty[STAGES]
    // Work units: CLUSTER m-tiles side by side (one per CTA of a cluster) x one n-tile. With
    // CLUSTER == 2 each CTA loads half of the unit's B tile and multicasts it to both.
    const int tiles_m = (M + BM - 1) / BM, tiles_n = (N + BN - 1) / BN;
    const int units_m = (tiles_m + CLUSTER - 1) / CLUSTER;
    const int per_e = units_m * tiles_n, KB = (K + BK - 1) / BK;
    const int units = (GROUPED ? E : 1) * per_e;
    const int first_unit = blockIdx.x / CLUSTER, unit_step = gridDim.x / CLUSTER;
#if CLUSTER == 2
    const int rank = (int)cluster_rank();
#else
    const int rank = 0;
#endif
    const int wg = threadIdx.x / 128;

    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            bar_init(bars + 8 * s, 1);
            bar_init(bars + 8 * (STAGES + s), 8 * CLUSTER);  // one arrival per math warp of the cluster
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
#if CLUSTER == 2
    cluster_sync();
#else
    __syncthreads();
#endif

    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");
        if (threadIdx.x == 0) {
            int stage = 0;
            u32 phase = 0;
            for (int unit = first_unit; unit < units; unit += unit_step) {
                int u, e, kb_lo, kb_hi, um, tn;
                unit_place(unit, per_e, kstart, KB, u, e, kb_lo, kb_hi);
                tile_coords(u, units_m, tiles_n, um, tn);
                const int tm = um * CLUSTER + rank;
                for (int kb = kb_lo; kb < kb_hi; ++kb) {
                    const u32 full = bars + 8 * stage, empty = bars + 8 * (STAGES + stage);
                    bar_wait(empty, phase ^ 1);
                    bar_expect(full, STAGE_BYTES + SB_STAGE_BYTES);
                    const u32 dst = base + stage * STAGE_BYTES;
                    tma_load(dst, &a_desc, full, kb * BK, tm * BM);
#if ROWWISE
                    tma_load(sb_smem + stage * SB_STAGE_BYTES, &s_desc, full, tn * BN, kb);
#endif
#if CLUSTER == 2
                    tma_load_multicast(dst + A_BYTES + rank * (B_BYTES / 2), &b_desc, full, kb * BK,
                                       tn * BN + rank * (BN / 2), (unsigned short)3);
#else
                    tma_load(dst + A_BYTES, &b_desc, full, kb * BK, tn * BN);
#endif
                    if (++stage == STAGES) { stage = 0; phase ^= 1; }
                }
            }
        }
        __syncwarp();
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");
        const int t = threadIdx.x - 128 * wg;      // thread within its warp group
        const int warp = t / 32, lane = t % 32;
        int it = 0;  // k-blocks consumed so far, over all tiles: stage it % STAGES, parity (it / STAGES) & 1
        const u32 my_c = c_smem + (wg - 1) * C_HALF_BYTES;
#if SINGLE_ACC
        // One accumulator per math warp group, taking turns between its HALVES 64-row halves (256-row
        // tiles: two halves, so the registers hold one accumulator and two sums; 192-wide tiles: one
        // half, the accumulator and the sum taking 96 registers each). The warp groups issue their WGMMA
        // groups alternately, so the Tensor Cores run one warp group's group while the other promotes.
        const int row_in_tile = (wg - 1) * 64 * HALVES + warp * 16 + lane / 4;  // and + 8; half h + 64 h
        const u32 a_off = (wg - 1) * 64 * HALVES * BK;
        const int NB = (N + 127) / 128;  // B's 128-row scale blocks
        float acc[NACC], sum[HALVES][NACC];
        if (wg == 2) turn_pass(wg);  // warp group 1 goes first
        for (int unit = first_unit; unit < units; unit += unit_step) {
            int tm, tn;
            tile_coords(unit, units_m, tiles_n, tm, tn);
            const int r0 = tm * BM + row_in_tile;
            const float *sar[2 * HALVES];  // this thread's rows r0, r0 + 8 of each half
#pragma unroll
            for (int j = 0; j < 2 * HALVES; ++j) sar[j] = sa + (long long)min(r0 + 64 * (j / 2) + 8 * (j % 2), M - 1) * sa_m;
            // A 192-wide tile spans two of B's 128-row scale blocks: columns from `split` on take the second.
            const int nb = (tn * BN) / 128, split = 128 - (tn * BN) % 128;
            (void)split;
            const float *sb0 = sb + (long long)nb * sb_n, *sb1 = sb + (long long)min(nb + 1, NB - 1) * sb_n;
#pragma unroll
            for (int h = 0; h < HALVES; ++h)
#pragma unroll
                for (int i = 0; i < NACC; ++i) sum[h][i] = 0.0f;
            // A k-block's scales are loaded while the previous k-block's last WGMMA group runs.
            float xa[2 * HALVES], xb0 = __ldg(sb0), xb1 = BN > 128 ? __ldg(sb1) : 0.0f;
#pragma unroll
            for (int j = 0; j < 2 * HALVES; ++j) xa[j] = __ldg(sar[j]);
            for (int kb = 0; kb < KB; ++kb, ++it) {
                float na[2 * HALVES], nb0, nb1;
#pragma unroll
                for (int h = 0; h < HALVES; ++h) {
                    turn_wait(wg);
                    issue(acc, base, bars, it, a_off + h * 64 * BK);
                    turn_pass(wg);
                    if (h == HALVES - 1) {
                        const long long nk = min(kb + 1, KB - 1);
#pragma unroll
                        for (int j = 0; j < 2 * HALVES; ++j) na[j] = __ldg(sar[j] + nk * sa_k);
                        nb0 = __ldg(sb0 + nk * sb_k);
                        nb1 = BN > 128 ? __ldg(sb1 + nk * sb_k) : 0.0f;
                    }
                    wait_all();
                    if (h == HALVES - 1) release(bars, it);
#if BN > 128
                    fold2(acc, sum[h], xa[2 * h] * xb0, xa[2 * h + 1] * xb0, xa[2 * h] * xb1, xa[2 * h + 1] * xb1, split);
#else
                    fold(acc, sum[h], xa[2 * h] * xb0, xa[2 * h + 1] * xb0);
#endif
                }
#pragma unroll
                for (int j = 0; j < 2 * HALVES; ++j) xa[j] = na[j];
                xb0 = nb0;
                xb1 = nb1;
            }
#pragma unroll
            for (int h = 0; h < HALVES; ++h)
                store_rows(sum[h], my_c, &c_desc, tm * BM + (wg - 1) * 64 * HALVES + 64 * h, tn * BN, wg, t);
        }
        if (wg == 1) turn_wait(wg);  // warp group 2's last pass
#else
        const int row_in_tile = (wg - 1) * 64 + warp * 16 + lane / 4;  // and row_in_tile + 8
        const u32 a_off = (wg - 1) * 64 * BK;
        float acc0[NACC], acc1[NACC], sum[NACC];
        for (int unit = first_unit; unit < units; unit += unit_step) {
            int u, e, kb_lo, kb_hi, um, tn;
            unit_place(unit, per_e, kstart, KB, u, e, kb_lo, kb_hi);
            tile_coords(u, units_m, tiles_n, um, tn);
            const int tm = um * CLUSTER + rank;  // past the last m-tile when tiles_m is odd: zeros in, nothing out
            const int nkb = kb_hi - kb_lo;
            const int r0 = tm * BM + row_in_tile;
            const float *sa0 = sa + (long long)min(r0, M - 1) * sa_m, *sa1 = sa + (long long)min(r0 + 8, M - 1) * sa_m;
            const float *sb_col = sb + (long long)((tn * BN) / 128) * sb_n;
#pragma unroll
            for (int i = 0; i < NACC; ++i) sum[i] = 0.0f;
#if GROUPED
            if (nkb == 0) {  // an expert without tokens: its gradient is zero
                store_rows(sum, my_c, &c_desc, e * M + tm * BM + (wg - 1) * 64, tn * BN, wg, t);
                continue;
            }
#endif
            // Two accumulators in turn: k-block kb + 1's WGMMAs run while kb's partial sum is promoted.
            // The scales of a k-block are loaded one step before the step that promotes it.
            float f0, f1, g0, g1;
            scales(sa0, sa1, sb_col, sa_k, sb_k, kb_lo, f0, f1);
            issue(acc0, base, bars, it, a_off);
            int kb = 0;
            for (; kb + 2 < nkb; kb += 2, it += 2) {  // k-block kb is in flight in acc0, its factors in f
                scales(sa0, sa1, sb_col, sa_k, sb_k, kb_lo + kb + 1, g0, g1);
                issue(acc1, base, bars, it + 1, a_off);
                wait_one();
                promote(acc0, sum, f0, f1, bars, it, sb_smem + ((it) % STAGES) * SB_STAGE_BYTES);
                scales(sa0, sa1, sb_col, sa_k, sb_k, kb_lo + kb + 2, f0, f1);
                issue(acc0, base, bars, it + 2, a_off);
                wait_one();
                promote(acc1, sum, g0, g1, bars, it + 1, sb_smem + ((it + 1) % STAGES) * SB_STAGE_BYTES);
            }
            if (kb + 1 < nkb) {  // the last two k-blocks
                scales(sa0, sa1, sb_col, sa_k, sb_k, kb_lo + kb + 1, g0, g1);
                issue(acc1, base, bars, it + 1, a_off);
                wait_one();
                promote(acc0, sum, f0, f1, bars, it, sb_smem + ((it) % STAGES) * SB_STAGE_BYTES);
                wait_all();
                promote(acc1, sum, g0, g1, bars, it + 1, sb_smem + ((it + 1) % STAGES) * SB_STAGE_BYTES);
                it += 2;
            } else {  // the last one
                wait_all();
                promote(acc0, sum, f0, f1, bars, it, sb_smem + ((it) % STAGES) * SB_STAGE_BYTES);
                it += 1;
            }
            store_rows(sum, my_c, &c_desc, e * M + tm * BM + (wg - 1) * 64, tn * BN, wg, t);
        }
#endif
        if (t == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
    }  // math warp groups
#if CLUSTER == 2
    cluster_sync();  // neither CTA leaves while the other may still multicast into it or arrive on its barriers
#endif
}
"""


def source(bn: int) -> str:
    """The kernel's CUDA C with its m64n{bn}k32 WGMMA; the caller defines BM, BN, STAGES, OUT_F32, CLUSTER,
    ROWWISE and replaces KNAME (`_kernel`)."""
    return _SOURCE.replace("WGMMA_ASM", _wgmma_asm(bn))


# --------------------------------------------------------------------------------------------------
# Host side: the driver's tensor-map encoder, the compiled variants, the launch.

_variants = cuda_kernels.CompiledVariants("FP8 GEMM", "cuBLAS")
_prototypes_set = False
_SMEM_LIMIT = 227 * 1024


def mode() -> str:
    m = os.environ.get("MOECO_FP8_GEMM", "auto").strip().lower()
    if m not in ("auto", "wgmma", "cublas"):
        raise ConfigError(f"MOECO_FP8_GEMM={m!r}: expected auto, wgmma or cublas")
    return m


def _lib():
    """The driver handle `cuda_kernels` opened, with the prototypes this module's calls need."""
    global _prototypes_set
    lib = cuda_kernels._driver()
    if not _prototypes_set:
        lib.cuTensorMapEncodeTiled.restype = ctypes.c_int
        lib.cuTensorMapEncodeTiled.argtypes = [
            ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64),
            ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint32),
            ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.cuFuncSetAttribute.restype = ctypes.c_int
        _prototypes_set = True
    return lib


class _Desc(ctypes.Structure):
    _fields_ = [("word", ctypes.c_uint64 * 16)]


_TMA_DTYPE = {1: 0, 2: 1, 4: 2}  # element bytes -> CU_TENSOR_MAP_DATA_TYPE_UINT8 / UINT16 / UINT32


def tensor_map(t: torch.Tensor, box_rows: int, box_cols: int | None = None, swizzle: bool = True) -> _Desc:
    """A TMA descriptor of a row-major 2-D tensor, boxes of box_rows rows x box_cols elements (default:
    128 bytes, with the 128-byte swizzle WGMMA reads), zero fill past the edges (loads) or clipping
    there (stores)."""
    rows, cols = t.shape
    es = t.element_size()
    desc = _Desc()
    dims = (ctypes.c_uint64 * 2)(cols, rows)
    strides = (ctypes.c_uint64 * 1)(t.stride(0) * es)
    box = (ctypes.c_uint32 * 2)(box_cols or 128 // es, box_rows)
    elem = (ctypes.c_uint32 * 2)(1, 1)
    # interleave none = 0; swizzle 128B = 3 or none = 0; L2 promotion 256B = 3; OOB fill none (zeros) = 0
    rc = _lib().cuTensorMapEncodeTiled(ctypes.byref(desc), _TMA_DTYPE[es], 2, ctypes.c_void_p(t.data_ptr()), dims,
                                       strides, box, elem, 0, 3 if swizzle else 0, 3, 0)
    if rc != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {rc} for a {tuple(t.shape)} operand")
    return desc


def _row_scales_map(b_scale: torch.Tensor, bn: int) -> _Desc:
    """B's per-row scales (N, KB) as a TMA map of their (KB, N) transpose, N contiguous: one box of bn
    scales per stage (no copy when b_scale is already outer-dim-major, as the quantizers write it)."""
    N = b_scale.shape[0]
    sbt = b_scale.t() if b_scale.stride(0) == 1 and b_scale.stride(1) == N else b_scale.t().contiguous()
    return tensor_map(sbt, 1, bn, swizzle=False)


def _smem(bn: int, out_f32: bool, stages: int, rowwise: bool = False, bm: int = 128) -> int:
    """Dynamic shared memory: the stages (with B's row scales when rowwise), the output buffers (64 rows
    per math warp group), the barriers, 1024 bytes of alignment slack."""
    return stages * ((bm + bn) * BK + (4 * bn if rowwise else 0)) + 128 * bn * (4 if out_f32 else 2) + 16 * stages + 1024


# Defaults. 4 stages: on the H200 the best stage count or within 2% of it at all 12 issue shapes (6 stages
# up to 10% slower, 3 stages 5-18%; BENCHMARKS.md, eighth session); it fits every variant's shared memory.
# 128-wide tiles: 64-wide ones were 0.69-1.07x BF16 where 128 gave 0.82-1.44x (same run, BENCHMARKS.md).
STAGES, BN = 4, 128


def check_variant(bn: int, out_f32: bool, stages: int, cluster: int, rowwise: bool = False, bm: int = 128,
                  grouped: bool = False) -> None:
    """A one-line ValueError for a tile shape, stage count or cluster size the kernel cannot take
    (rather than a failed compile or launch, which would turn the kernel off for the process)."""
    if grouped and not (rowwise and bm == 128 and bn in (64, 128) and cluster == 1):
        raise ValueError("fp8_grouped_wgrad_nt: takes B scaled per row, bm=128, bn 64 or 128 and cluster=1")
    if bm not in (128, 256):
        raise ValueError(f"fp8_gemm_nt: bm={bm}; valid: 128, 256")
    if bm == 256 and (cluster != 1 or rowwise):
        raise ValueError("fp8_gemm_nt: bm=256 takes B scaled per 128x128 block and cluster=1; use bm=128")
    if bn not in (64, 128, 192):
        raise ValueError(f"fp8_gemm_nt: bn={bn}; valid: 64, 128, 192 (a tile's accumulators fill the registers)")
    if bn == 192 and (bm != 128 or cluster != 1 or rowwise):
        raise ValueError("fp8_gemm_nt: bn=192 takes bm=128, cluster=1 and B scaled per 128x128 block; use bn=128")
    if cluster not in (1, 2):
        raise ValueError(f"fp8_gemm_nt: cluster={cluster}; valid: 1, 2")
    need = _smem(bn, out_f32, stages, rowwise, bm)
    if stages < 2 or need > _SMEM_LIMIT:
        most = max(s for s in range(1, 16) if _smem(bn, out_f32, s, rowwise, bm) <= _SMEM_LIMIT)
        raise ValueError(f"fp8_gemm_nt: stages={stages} needs {need} bytes of shared memory at bn={bn}, "
                         f"{'fp32' if out_f32 else 'bf16'} out, bm={bm}; use 2 to {most}")


def _kernel(bn: int, out_f32: bool, stages: int, cluster: int, rowwise: bool, bm: int = 128, grouped: bool = False):
    """(kernel, shared memory bytes, CTA slots) of a variant, or None (with one warning) when NVRTC or the
    driver cannot build it here."""
    check_variant(bn, out_f32, stages, cluster, rowwise, bm, grouped)

    def build():
        name = f"moeco_fp8_gemm_{bm}_{bn}_{int(out_f32)}_{stages}_{cluster}_{int(rowwise)}{'_grouped' if grouped else ''}"
        defs = [f"-DBM={bm}", f"-DBN={bn}", f"-DSTAGES={stages}", f"-DOUT_F32={int(out_f32)}", f"-DCLUSTER={cluster}",
                f"-DROWWISE={int(rowwise)}", f"-DGROUPED={int(grouped)}"]
        kern = torch.cuda._compile_kernel(source(bn).replace("KNAME", name), name, compute_capability="90a",
                                          nvcc_options=defs)
        smem = _smem(bn, out_f32, stages, rowwise, bm)
        rc = _lib().cuFuncSetAttribute(kern.func, 8, smem)  # max dynamic shared memory
        if rc != 0:
            raise RuntimeError(f"cuFuncSetAttribute({smem} bytes) failed with CUresult {rc}")
        slots = (_max_clusters(kern.func, cluster, smem) if cluster > 1  # co-resident clusters
                 else torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count)
        return kern, smem, slots

    return _variants.get((torch.cuda.current_device(), bn, out_f32, stages, cluster, rowwise, bm, grouped), build)


def supported(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor,
              out_dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether `fp8_gemm_nt` takes these operands (else the caller uses cuBLAS or Triton): b_scale
    either 128x128 blocks (ceil(N / 128), KB) or one scale per row of B (N, KB), Wgrad's 128x1 tiles."""
    if _variants.broken is not None or a_q.dim() != 2 or b_q.dim() != 2 or not a_q.is_cuda \
            or out_dtype not in (torch.bfloat16, torch.float32):
        return False
    M, K = a_q.shape
    N = b_q.shape[0]
    KB = -(-K // BK)
    if b_q.shape[1] != K or tuple(a_scale.shape) != (M, KB) \
            or tuple(b_scale.shape) not in ((-(-N // 128), KB), (N, KB)):
        return False
    if a_q.dtype != FP8_DTYPE or b_q.dtype != FP8_DTYPE or a_scale.dtype != torch.float32 \
            or b_scale.dtype != torch.float32:
        return False
    ok = (K % 16 == 0 and N % 8 == 0 and M > 0
          and a_q.stride(1) == 1 and b_q.stride(1) == 1
          and a_q.stride(0) % 16 == 0 and b_q.stride(0) % 16 == 0
          and a_q.data_ptr() % 16 == 0 and b_q.data_ptr() % 16 == 0)
    return ok and cuda_kernels._device_ok(a_q.device) and cuda_kernels.capability(a_q.device) == (9, 0)


class _LaunchAttr(ctypes.Structure):  # CUlaunchAttribute: an id, padding to 8 bytes, a 64-byte value
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_uint32 * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint32 * 3), ("block", ctypes.c_uint32 * 3), ("smem", ctypes.c_uint32),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttr)), ("num_attrs", ctypes.c_uint32)]


def _config(grid: int, cluster: int, smem: int, stream) -> tuple:
    attr = _LaunchAttr()
    attr.id = 4  # CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
    attr.value[0], attr.value[1], attr.value[2] = cluster, 1, 1
    cfg = _LaunchConfig()
    cfg.grid[:] = (grid, 1, 1)
    cfg.block[:] = (_THREADS, 1, 1)
    cfg.smem = smem
    cfg.stream = stream
    cfg.attrs = ctypes.pointer(attr)
    cfg.num_attrs = 1
    return cfg, attr


def _max_clusters(func, cluster: int, smem: int) -> int:
    """How many clusters of `cluster` CTAs fit on the device at once (cuOccupancyMaxActiveClusters)."""
    cfg, _keep = _config(cluster * 1024, cluster, smem, None)
    n = ctypes.c_int()
    rc = _lib().cuOccupancyMaxActiveClusters(ctypes.byref(n), func, ctypes.byref(cfg))
    if rc != 0 or n.value < 1:
        raise RuntimeError(f"cuOccupancyMaxActiveClusters failed (CUresult {rc}, {n.value} clusters)")
    return n.value


def tile_width(N: int, rowwise: bool = False, bm: int = 128, cluster: int = 1) -> int:
    """The default tile width: 192 where N is a multiple of 192 but not of 128 (MLA's N = 576: three
    tiles instead of 4.5; on the H200 0.043 vs 0.054 ms at 4096 x 7168 x 576, 0.129 vs 0.140 ms at 16384,
    1.09x / 1.43x BF16), else 128 (192-wide tiles measured 0.84-0.98x the 128-wide ones where N % 128 == 0;
    BENCHMARKS.md, ninth session)."""
    if N % 192 == 0 and N % 128 and not rowwise and bm == 128 and cluster == 1:
        return 192
    return BN


def fp8_gemm_nt(a_q, a_scale, b_q, b_scale, out_dtype=torch.bfloat16, *, bn: int | None = None,
                stages: int | None = None, cluster: int = 1, bm: int = 128):
    """C (M, N) = A (M, K) . B (N, K)^T, A's scales 1x128, B's 128x128 blocks (ceil(N / 128), KB) or one
    per row (N, KB); the caller checked `supported`. bn / stages / cluster / bm: see `check_variant`;
    bn None: `tile_width(N)`; stages None: 4, or as many as fit. Returns None when the kernel cannot be
    compiled here (the caller then uses cuBLAS)."""
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"fp8_gemm_nt: out_dtype {out_dtype} not supported; use bfloat16 or float32")
    M, K = a_q.shape
    N = b_q.shape[0]
    KB = -(-K // BK)
    rowwise = tuple(b_scale.shape) != (-(-N // 128), KB)  # else (N, KB): one scale per row (supported checked)
    if bn is None:
        bn = tile_width(N, rowwise, bm, cluster)
    if stages is None:  # the default, or as many as fit (256-row tiles with fp32 out take 3)
        stages = STAGES
        while stages > 2 and _smem(bn, out_dtype == torch.float32, stages, rowwise, bm) > _SMEM_LIMIT:
            stages -= 1
    cuda_kernels._ensure_context(a_q.device)
    got = _kernel(bn, out_dtype == torch.float32, stages, cluster, rowwise, bm)
    if got is None:
        return None
    kern, smem, slots = got
    out = torch.empty((M, N), dtype=out_dtype, device=a_q.device)
    units = -(-M // (bm * cluster)) * -(-N // bn)
    grid = cluster * min(units, slots)
    da, db, dc = tensor_map(a_q, bm), tensor_map(b_q, bn // cluster), tensor_map(out, 64)
    if rowwise:  # B's scales as (KB, N) rows, N contiguous: one TMA box of bn scales per stage
        ds = _row_scales_map(b_scale, bn)
    else:
        ds = _Desc()  # unused
    ints = [ctypes.c_int(v) for v in (M, N, K, a_scale.stride(0), a_scale.stride(1), b_scale.stride(0),
                                       b_scale.stride(1))]
    ptrs = [ctypes.c_void_p(t.data_ptr()) for t in (a_scale, b_scale, out)]
    params = [da, db, dc, ds, *ptrs, *ints, ctypes.c_void_p(0), ctypes.c_int(1)]  # the kernel's parameters, in order
    if cluster == 1:
        cuda_kernels.launch(kern.func, (grid, 1, 1), (_THREADS, 1, 1), params, a_q.device, smem)
    else:
        arr = (ctypes.c_void_p * len(params))(*[ctypes.addressof(p) for p in params])
        cfg, _keep = _config(grid, cluster, smem, cuda_kernels._raw_stream(a_q.device))
        rc = _lib().cuLaunchKernelEx(ctypes.byref(cfg), kern.func, arr, None)
        if rc != 0:
            raise RuntimeError(f"moeco FP8 GEMM launch failed with CUresult {rc}")
    return out


def grouped_supported(a_q: torch.Tensor, a_scale: torch.Tensor, b_q: torch.Tensor, b_scale: torch.Tensor) -> bool:
    """Whether `fp8_grouped_wgrad_nt` takes these operands: A (M, Tp) and B (N, Tp) E4M3 with one float32 scale
    per row and 128-token block ((M, Tp / 128), (N, Tp / 128)), M a multiple of 128 (a tile's rows never
    cross into the next expert's output), N a multiple of 4 (16-byte fp32 output rows), Tp of 128."""
    if _variants.broken is not None or a_q.dim() != 2 or b_q.dim() != 2 or not a_q.is_cuda:
        return False
    M, Tp = a_q.shape
    N = b_q.shape[0]
    if b_q.shape[1] != Tp or Tp % BK or M % 128 or N % 4 or M == 0 or N == 0:
        return False
    if tuple(a_scale.shape) != (M, Tp // BK) or tuple(b_scale.shape) != (N, Tp // BK):
        return False
    if a_q.dtype != FP8_DTYPE or b_q.dtype != FP8_DTYPE or a_scale.dtype != torch.float32 \
            or b_scale.dtype != torch.float32:
        return False
    ok = (a_q.is_contiguous() and b_q.is_contiguous() and a_q.data_ptr() % 16 == 0 and b_q.data_ptr() % 16 == 0)
    return ok and cuda_kernels._device_ok(a_q.device) and cuda_kernels.capability(a_q.device) == (9, 0)


def fp8_grouped_wgrad_nt(a_q, a_scale, b_q, b_scale, kstart: torch.Tensor, E: int, *, bn: int = BN,
                         stages: int = STAGES) -> torch.Tensor | None:
    """The routed experts' Wgrad in one launch: out[e] (M, N) fp32 = sum over expert e's 128-token blocks kb of
    (A_kb . B_kb^T) * a_scale[:, kb] * b_scale[:, kb]^T, A (M, Tp) and B (N, Tp) both quantized along the
    tokens, expert e owning tokens kstart[e] .. kstart[e + 1] (int64 on the device, multiples of 128, E + 1
    entries; no host sync); an expert without tokens gets zeros. The caller checked `grouped_supported`.
    None when the kernel cannot be compiled here (the caller then uses Triton's)."""
    M, Tp = a_q.shape
    N = b_q.shape[0]
    cuda_kernels._ensure_context(a_q.device)
    got = _kernel(bn, True, stages, 1, True, 128, grouped=True)
    if got is None:
        return None
    kern, smem, slots = got
    out = torch.empty((E, M, N), dtype=torch.float32, device=a_q.device)
    if E == 0:
        return out
    units = E * (M // 128) * -(-N // bn)
    descs = [tensor_map(a_q, 128), tensor_map(b_q, bn), tensor_map(out.view(E * M, N), 64),
             _row_scales_map(b_scale, bn)]
    kstart = kstart.to(device=a_q.device, dtype=torch.int64).contiguous()
    ints = [ctypes.c_int(v) for v in (M, N, Tp, a_scale.stride(0), a_scale.stride(1), b_scale.stride(0),
                                       b_scale.stride(1))]
    ptrs = [ctypes.c_void_p(t.data_ptr()) for t in (a_scale, b_scale, out)]
    params = [*descs, *ptrs, *ints, ctypes.c_void_p(kstart.data_ptr()), ctypes.c_int(E)]
    cuda_kernels.launch(kern.func, (min(units, slots), 1, 1), (_THREADS, 1, 1), params, a_q.device, smem)
    return out


def status() -> str:
    if _variants.broken is not None:
        return f"wgmma gemm off: {_variants.broken}"
    return f"wgmma gemm: MOECO_FP8_GEMM={mode()}, compiled {len(_variants.cache)}"
