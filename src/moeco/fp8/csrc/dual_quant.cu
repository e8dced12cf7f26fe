
#define TOKW 16

// bf16 -> float32 through volatile asm: the compiler would otherwise keep all 64 unpacked values of a
// thread alive between the three passes over them (137 registers, one block per multiprocessor) instead
// of re-deriving them from the 32 loaded words (two integer instructions per pair).
__device__ __forceinline__ void unpack4(uint2 w, float *f) {
#if IN_KIND == 0
    unsigned a, b, c, d;
    asm volatile("shl.b32 %0, %1, 16;" : "=r"(a) : "r"(w.x));
    asm volatile("and.b32 %0, %1, 0xFFFF0000;" : "=r"(b) : "r"(w.x));
    asm volatile("shl.b32 %0, %1, 16;" : "=r"(c) : "r"(w.y));
    asm volatile("and.b32 %0, %1, 0xFFFF0000;" : "=r"(d) : "r"(w.y));
    f[0] = __uint_as_float(a);
    f[1] = __uint_as_float(b);
    f[2] = __uint_as_float(c);
    f[3] = __uint_as_float(d);
#else
    f[0] = f16_to_f32((unsigned short)(w.x & 0xFFFFu));
    f[1] = f16_to_f32((unsigned short)(w.x >> 16));
    f[2] = f16_to_f32((unsigned short)(w.y & 0xFFFFu));
    f[3] = f16_to_f32((unsigned short)(w.y >> 16));
#endif
}

// One butterfly step: lanes with `bit` set keep values half .. 2 half - 1, the others 0 .. half - 1, each
// maxed with the partner's copy of the same tokens; the kept values move to 0 .. half - 1.
template <int HALF>
__device__ __forceinline__ void halve(float *m, int lane, int bit) {
    const bool hi = (lane & bit) != 0;
#pragma unroll
    for (int i = 0; i < HALF; ++i) {
        const float give = hi ? m[i] : m[i + HALF];
        const float keep = hi ? m[i + HALF] : m[i];
        m[i] = fmaxf(keep, __shfl_xor_sync(0xffffffffu, give, bit));
    }
}

extern "C" __global__ void BOUNDS KNAME(
    const uint2 *__restrict__ x, unsigned char *__restrict__ q_row, float *__restrict__ s_row,
    unsigned char *__restrict__ q_col, float *__restrict__ s_col, int T, int C, int stride_x, int stride_qc) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int c = blockIdx.x * 128 + lane * 4;
    const long long t0 = (long long)blockIdx.y * 128 + warp * TOKW;
    const bool c_ok = c < C;  // C % 4 == 0: a thread's four channels are all in or all out
    const int n_tok = (int)min((long long)TOKW, max(0LL, (long long)T - t0));
    const int n_ok = c_ok ? n_tok : 0;
    const int wpr = stride_x / 4;  // 8-byte words per row of x
    uint2 w[TOKW];
    const uint2 *xp = x + t0 * wpr + c / 4;
#pragma unroll
    for (int j = 0; j < TOKW; ++j) {
        w[j] = j < n_ok ? *xp : make_uint2(0u, 0u);
        xp += wpr;
    }
    // per-token maxima over this thread's 4 channels, then over the warp's 128 (a halving butterfly:
    // at each step a lane keeps half its values, maxed with the other half of its partner's)
    float m[TOKW];
    float ca[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < TOKW; ++j) {
        float f[4];
        unpack4(w[j], f);
        m[j] = fmaxf(fmaxf(fabsf(f[0]), fabsf(f[1])), fmaxf(fabsf(f[2]), fabsf(f[3])));
#pragma unroll
        for (int i = 0; i < 4; ++i) ca[i] = fmaxf(ca[i], fabsf(f[i]));
    }
    halve<8>(m, lane, 16);
    halve<4>(m, lane, 8);
    halve<2>(m, lane, 4);
    halve<1>(m, lane, 2);
    m[0] = fmaxf(m[0], __shfl_xor_sync(0xffffffffu, m[0], 1));  // lanes 2j and 2j + 1: token j
    const float rs = scale_of(m[0]), rr = __frcp_rn(rs);
    if ((lane & 1) == 0 && (lane >> 1) < n_tok)
        s_row[(long long)blockIdx.x * T + t0 + (lane >> 1)] = rs;
    unsigned *qr = reinterpret_cast<unsigned *>(q_row + t0 * C + c);
#pragma unroll
    for (int j = 0; j < TOKW; ++j) {
        const float sj = __shfl_sync(0xffffffffu, rs, 2 * j), rj = __shfl_sync(0xffffffffu, rr, 2 * j);
        float f[4];
        unpack4(w[j], f);
        const unsigned v = f32x4_to_e4m3x4(div_by(f[0], sj, rj), div_by(f[1], sj, rj), div_by(f[2], sj, rj),
                                           div_by(f[3], sj, rj));
        if (j < n_ok) *qr = v;
        qr += C / 4;
    }
    __shared__ float red[8 * 128];
    __shared__ unsigned qs[128 * 33];
#pragma unroll
    for (int i = 0; i < 4; ++i) red[warp * 128 + lane * 4 + i] = ca[i];
    __syncthreads();
    float sc[4], rc[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float a = red[lane * 4 + i];
#pragma unroll
        for (int k = 1; k < 8; ++k) a = fmaxf(a, red[k * 128 + lane * 4 + i]);
        sc[i] = scale_of(a);
        rc[i] = __frcp_rn(sc[i]);
        if (warp == 0 && c_ok) s_col[(long long)blockIdx.y * C + c + i] = sc[i];
    }
#pragma unroll
    for (int k = 0; k < TOKW / 4; ++k) {
        float f[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) unpack4(w[4 * k + j], f[j]);
#pragma unroll
        for (int i = 0; i < 4; ++i)
            qs[(lane * 4 + i) * 33 + warp * (TOKW / 4) + k] =
                f32x4_to_e4m3x4(div_by(f[0][i], sc[i], rc[i]), div_by(f[1][i], sc[i], rc[i]),
                                div_by(f[2][i], sc[i], rc[i]), div_by(f[3][i], sc[i], rc[i]));
    }
    __syncthreads();
    store_transposed<128>(qs, q_col, blockIdx.x * 128, C, (long long)blockIdx.y * 128, T, stride_qc);
}
