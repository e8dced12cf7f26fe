
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
