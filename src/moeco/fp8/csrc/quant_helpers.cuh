
__device__ __forceinline__ float f16_to_f32(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ void e4m3x2_to_f32(unsigned short v, float &lo, float &hi) {
    unsigned h2;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(v));
    lo = f16_to_f32((unsigned short)(h2 & 0xFFFFu));
    hi = f16_to_f32((unsigned short)(h2 >> 16));
}

__device__ __forceinline__ unsigned f32x4_to_e4m3x4(float a, float b, float c, float d) {
    unsigned short lo, hi;  // cvt puts its first source in the upper byte
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(lo) : "f"(b), "f"(a));
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(hi) : "f"(d), "f"(c));
    return (unsigned)lo | ((unsigned)hi << 16);
}

// 256 threads a block; MINB (if defined): blocks per multiprocessor the compiler must fit.
#ifdef MINB
#define BOUNDS __launch_bounds__(256, MINB)
#else
#define BOUNDS __launch_bounds__(256)
#endif

// The scale of a tile from its max-abs: max(amax, 1e-4) / 448 correctly rounded, or (POW2) rounded up to
// a power of two on the bits.
__device__ __forceinline__ float scale_of(float amax) {
    float v = __fdiv_rn(fmaxf(amax, 1e-4f), 448.0f);
#if POW2
    v = __uint_as_float((__float_as_uint(v) + 0x7FFFFFu) & 0x7F800000u);
#endif
    return v;
}

// x / s correctly rounded from r = 1/s (correctly rounded): Markstein's correction, two fused
// multiply-adds. The residual is taken as q*s - x and subtracted, which is the same number for
// x != 0 and keeps the sign of a zero (x = -0: q = -0, e = +0, -e*r + q = -0), so no select.
__device__ __forceinline__ float div_by(float x, float s, float r) {
    const float q = __fmul_rn(x, r);
    const float e = __fmaf_rn(q, s, -x);
    return __fmaf_rn(-e, r, q);
}

// The transposed store both kernels end with: the block's E4M3 tile is in shared memory as rows of 33
// words (row = channel: 32 words of 4 tokens, 1 pad word); 8 threads write each channel's 128 bytes of
// q (16 tokens each), so a warp stores 4 whole rows. ROWS channels from c0, 128 tokens from t0; 256 threads.
template <int ROWS>
__device__ __forceinline__ void store_transposed(const unsigned *qs, unsigned char *q, unsigned c0, int C, long long t0,
                                                 int T, int stride_q) {
    const int tid = threadIdx.x, chunk = tid & 7;
    const long long tt = t0 + 16 * chunk;
#pragma unroll
    for (int pass = 0; pass < ROWS / 32; ++pass) {
        const int row = pass * 32 + (tid >> 3);
        const int cg = c0 + row;
        if (cg >= C) continue;
        const unsigned *src = qs + row * 33 + 4 * chunk;
        const unsigned a0 = src[0], a1 = src[1], a2 = src[2], a3 = src[3];
        unsigned char *dst = q + (long long)cg * stride_q + tt;
        if (tt + 16 <= T && (stride_q & 15) == 0) {
            *reinterpret_cast<uint4 *>(dst) = make_uint4(a0, a1, a2, a3);
        } else {
            const unsigned wd[4] = {a0, a1, a2, a3};
            for (int j = 0; j < 16 && tt + j < T; ++j) dst[j] = (unsigned char)(wd[j >> 2] >> (8 * (j & 3)));
        }
    }
}

