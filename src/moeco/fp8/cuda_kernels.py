"""CUDA C kernels compiled at run time with NVRTC, for what Triton does not do well.

token_wise: the 128x1 quantization Wgrad needs (x (T, C) quantized along T in 128-token tiles and
    written transposed, q (C, T) E4M3 and s (C, ceil(T/128)) float32 with strides (1, C)), from
    bf16 / fp16 / fp32 input or from the forward's FP8 copy with its 1x128 scales (dequantized on
    the fly: the re-tiling), optionally reading the tokens through a row map (-1: a zero row), as
    the grouped Wgrad does. Triton's version of it (`triton_kernels.quantize_act_1x128_t`) ran at
    39-55% of HBM bandwidth on the H200 whatever its tile, warps or transposition form
    (bench/fp8_gemm_tune.py, section retile): the column reduction and the transposed store go
    through layout conversions it cannot overlap with the loads.

    This kernel: 256 threads per 128-token x 64-channel tile. Each thread loads 8 channels of 4
    tokens with 16-byte vector loads (a warp reads 4 rows x 128 contiguous bytes), dequantizes
    into a padded shared-memory tile (pitch 65 floats: the column reads are conflict-free), then
    each thread owns one channel and 32 tokens: the amax of its 32, the 4-way max across threads
    through shared memory, the scale, and 32 E4M3 bytes written as two 16-byte stores into the
    channel's row of q. The grid runs channel tiles fastest, so neighbouring blocks read
    neighbouring bytes of the same rows.

Arithmetic is the reference's (`moeco.fp8.quantize`): s = max(amax, 1e-4) / 448 correctly rounded
(or rounded up to a power of two on the bits), q = e4m3(x / s) correctly rounded, ties to even,
FP8 input dequantized as float(q) * scale in float32. tests/test_fp8_gpu.py checks the bits
against the CPU reference for every input kind, a row map, ragged T and C, and pow2 scales.

Compiled per variant on first use with `torch.cuda._compile_kernel` (NVRTC, which ships with
PyTorch's CUDA builds; it looks for CUDA's headers under CUDA_HOME, though this source includes
none). Needs compute capability 8.9+ (the E4M3 conversion instructions). When anything is missing
the callers use the Triton kernel; MOECO_FP8_TOKENWISE=triton forces that, =cuda requires this one.
"""

from __future__ import annotations

import os
import threading
import warnings

import torch

from moeco.errors import ConfigError

FP8_DTYPE = torch.float8_e4m3fn

_SOURCE = r"""
#define TT 128
#define TC 64
#define PITCH 65

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

// 8 consecutive channels of one row, as float32.
__device__ __forceinline__ void load8(const void *base, long long off, float *v) {
#if IN_KIND == 0 || IN_KIND == 1
    uint4 u = *reinterpret_cast<const uint4 *>(reinterpret_cast<const unsigned short *>(base) + off);
    unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#if IN_KIND == 0
        v[2 * i] = __uint_as_float(w[i] << 16);
        v[2 * i + 1] = __uint_as_float(w[i] & 0xFFFF0000u);
#else
        v[2 * i] = f16_to_f32((unsigned short)(w[i] & 0xFFFFu));
        v[2 * i + 1] = f16_to_f32((unsigned short)(w[i] >> 16));
#endif
    }
#elif IN_KIND == 2
    const float4 *p = reinterpret_cast<const float4 *>(reinterpret_cast<const float *>(base) + off);
    float4 a = p[0], b = p[1];
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
#else
    uint2 u = *reinterpret_cast<const uint2 *>(reinterpret_cast<const unsigned char *>(base) + off);
    unsigned w[2] = {u.x, u.y};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        e4m3x2_to_f32((unsigned short)(w[i] & 0xFFFFu), v[4 * i], v[4 * i + 1]);
        e4m3x2_to_f32((unsigned short)(w[i] >> 16), v[4 * i + 2], v[4 * i + 3]);
    }
#endif
}

extern "C" __global__ void __launch_bounds__(256) KNAME(
    const void *__restrict__ x, const float *__restrict__ xs, const int *__restrict__ rows,
    unsigned char *__restrict__ q, float *__restrict__ s,
    int T_out, int C, int stride_x, int xs_st, int xs_sc, int stride_q) {
    __shared__ float tile[TT * PITCH];
    __shared__ float red[4 * TC];
    const int tid = threadIdx.x;
    const int c0 = blockIdx.x * TC;
    const long long t0 = (long long)blockIdx.y * TT;

    // 1. load: thread -> 8 channels (cl .. cl + 7) of rows r, r + 32, r + 64, r + 96
    const int cl = (tid & 7) * 8;
    const int c = c0 + cl;
    float v[4][8];
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const int r = (tid >> 3) + 32 * p;
        const long long t = t0 + r;
        long long src = t;
        bool ok = t < T_out && c < C;
#if GATHER
        if (ok) {
            src = rows[t];
            ok = src >= 0;
        }
#endif
        if (ok) {
            load8(x, src * stride_x + c, v[p]);
#if IN_KIND == 3
            const float sc = xs[src * xs_st + (long long)(c >> 7) * xs_sc];
#pragma unroll
            for (int i = 0; i < 8; ++i) v[p][i] = v[p][i] * sc;
#endif
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) v[p][i] = 0.0f;
        }
    }
#pragma unroll
    for (int p = 0; p < 4; ++p) {
        const int r = (tid >> 3) + 32 * p;
#pragma unroll
        for (int i = 0; i < 8; ++i) tile[r * PITCH + cl + i] = v[p][i];
    }
    __syncthreads();

    // 2. thread -> channel cc, tokens 32 * qd .. 32 * qd + 31
    const int cc = tid & (TC - 1);
    const int qd = tid >> 6;
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < 32; ++j) amax = fmaxf(amax, fabsf(tile[(qd * 32 + j) * PITCH + cc]));
    red[qd * TC + cc] = amax;
    __syncthreads();
    amax = fmaxf(fmaxf(red[cc], red[TC + cc]), fmaxf(red[2 * TC + cc], red[3 * TC + cc]));
    float scale = __fdiv_rn(fmaxf(amax, 1e-4f), 448.0f);
#if POW2
    scale = __uint_as_float((__float_as_uint(scale) + 0x7FFFFFu) & 0x7F800000u);
#endif
    const int cg = c0 + cc;
    if (cg >= C) return;
    if (qd == 0) s[(long long)blockIdx.y * C + cg] = scale;
    unsigned w[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const float *col = tile + (qd * 32 + 4 * k) * PITCH + cc;
        w[k] = f32x4_to_e4m3x4(__fdiv_rn(col[0], scale), __fdiv_rn(col[PITCH], scale),
                               __fdiv_rn(col[2 * PITCH], scale), __fdiv_rn(col[3 * PITCH], scale));
    }
    const long long tq = t0 + qd * 32;
    unsigned char *dst = q + (long long)cg * stride_q + tq;
    if (tq + 32 <= T_out && (stride_q & 15) == 0) {
        uint4 *d = reinterpret_cast<uint4 *>(dst);
        d[0] = make_uint4(w[0], w[1], w[2], w[3]);
        d[1] = make_uint4(w[4], w[5], w[6], w[7]);
    } else {
        for (int j = 0; j < 32 && tq + j < T_out; ++j) dst[j] = (unsigned char)(w[j >> 2] >> (8 * (j & 3)));
    }
}
"""

_IN_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, FP8_DTYPE: 3}
_ELEM = {0: 2, 1: 2, 2: 4, 3: 1}
_lock = threading.Lock()
_cache: dict[tuple, object] = {}
_broken: str | None = None  # why compiling failed, once


def mode() -> str:
    m = os.environ.get("MOECO_FP8_TOKENWISE", "auto").strip().lower()
    if m not in ("auto", "cuda", "triton"):
        raise ConfigError(f"MOECO_FP8_TOKENWISE={m!r}: expected auto, cuda or triton")
    return m


def _device_ok(device: torch.device) -> bool:
    return (device.type == "cuda" and torch.version.cuda is not None
            and torch.cuda.get_device_capability(device) >= (8, 9)
            and hasattr(torch.cuda, "_compile_kernel"))


def _kernel(in_kind: int, gather: bool, pow2: bool):
    """The compiled variant, or None (with one warning) when NVRTC cannot build it here."""
    global _broken
    key = (torch.cuda.current_device(), in_kind, gather, pow2)
    k = _cache.get(key)
    if k is not None or _broken is not None:
        return k
    with _lock:
        if key not in _cache and _broken is None:
            name = f"moeco_token_wise_{in_kind}{int(gather)}{int(pow2)}"
            src = _SOURCE.replace("KNAME", name)
            defs = [f"-DIN_KIND={in_kind}", f"-DGATHER={int(gather)}", f"-DPOW2={int(pow2)}"]
            try:
                _cache[key] = torch.cuda._compile_kernel(src, name, nvcc_options=defs)
            except Exception as exc:  # no NVRTC, no CUDA_HOME, an old driver: Triton does it instead
                _broken = f"{type(exc).__name__}: {exc}"[:300]
                warnings.warn(f"moeco: the NVRTC token-wise FP8 kernel did not compile ({_broken}); using "
                              "Triton's", stacklevel=3)
    return _cache.get(key)


def token_wise_supported(x: torch.Tensor, x_scale: torch.Tensor | None) -> bool:
    """Whether `token_wise` takes this input (else the caller uses Triton): CUDA, sm_89+, a dtype it
    reads, C a multiple of 8 with rows aligned for its vector loads, and no earlier compile failure."""
    if _broken is not None or x.dim() != 2 or not x.is_cuda or x.dtype not in _IN_KIND:
        return False
    if (x.dtype == FP8_DTYPE) != (x_scale is not None):
        return False
    C = x.shape[1]
    vec = min(16, 8 * x.element_size())  # bytes per vector load: 8 channels (two 16-byte loads of fp32)
    return (C % 8 == 0 and x.stride(1) == 1 and (x.stride(0) * x.element_size()) % vec == 0
            and x.data_ptr() % vec == 0 and _device_ok(x.device))


def token_wise(x: torch.Tensor, x_scale: torch.Tensor | None = None, *, pow2_scale: bool = False,
               rows: torch.Tensor | None = None):
    """x (T, C) -> q (C, T') E4M3, s (C, ceil(T'/128)) with strides (1, C); see the module docstring.

    `x_scale` (T, ceil(C/128)), any strides: x is FP8 with 1x128 scales and is dequantized first.
    `rows` (T',) int32: output token t is x's row rows[t], a zero row where rows[t] < 0.
    The caller checks `token_wise_supported` first; None when the kernel cannot be compiled here.
    """
    T, C = x.shape
    T_out = T if rows is None else rows.numel()
    tb = -(-T_out // 128)
    q = torch.empty((C, T_out), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((tb, C), dtype=torch.float32, device=x.device).t()
    if T_out == 0 or C == 0:
        return q, s
    k = _kernel(_IN_KIND[x.dtype], rows is not None, pow2_scale)
    if k is None:
        return None
    if rows is not None and rows.dtype != torch.int32:
        rows = rows.to(torch.int32)
    xs = x_scale if x_scale is not None else s  # placeholder pointers when unused
    rw = rows if rows is not None else s
    k(grid=(-(-C // 64), tb, 1), block=(256, 1, 1),
      args=[x, xs, rw, q, s, T_out, C, x.stride(0), xs.stride(0) if x_scale is not None else 0,
            xs.stride(1) if x_scale is not None else 0, q.stride(0)])
    return q, s


def status() -> str:
    """One line for logs and benches: whether the NVRTC kernels are in use, and why not."""
    if _broken is not None:
        return f"cuda kernels off: {_broken}"
    return f"cuda kernels: MOECO_FP8_TOKENWISE={mode()}, compiled {len(_cache)}"
