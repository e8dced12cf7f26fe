"""A CUDA C kernel compiled at run time with NVRTC, where Triton's version is the slower one.

token_wise: the 128x1 quantization Wgrad needs. x (T, C) is quantized along T in 128-token tiles
    and written transposed: q (C, T) E4M3 and s (C, ceil(T/128)) float32 with strides (1, C). It
    reads bf16 / fp16 / fp32, or the forward's FP8 copy with its 1x128 scales (dequantized on the
    fly: the re-tiling), optionally through a row map (-1: a zero row) as the grouped Wgrad does.

    Layout: 256 threads per 128-token tile of 32 words of channels (64 bf16, 128 FP8, 32 fp32).
    Thread (warp w, lane l) loads word l of tokens 16w .. 16w + 15, so a warp reads 128 contiguous
    bytes of each row; keeps them in registers for the amax (its 16 tokens, then the 8 warps'
    maxima through shared memory) and the division; and passes the E4M3 words through shared
    memory (rows of 33 words) so that 8 threads write each channel's 128-byte row of q: a warp
    stores 4 full rows. Division: one reciprocal per channel and Markstein's correction
    (x * r, then two fused multiply-adds), which gives the correctly rounded x / s. Per-token values
    the warp shares (the FP8 input's scale, the row map's source row) are loaded by one lane each
    and passed by shuffles; the loads step a pointer by the row stride.

    Measured on the H200 (BENCHMARKS.md, tenth session): 0.094 ms for 16384 x 7168 from bf16 (78%
    of HBM bandwidth) and 0.096 ms from FP8 (51%; 2 + 1 and 1 + 1 bytes per element). The first
    form of this kernel ran 0.110 and 0.117 ms (Triton's 0.137 and 0.130): it spent half its
    instructions on 64-bit address arithmetic and a select per element, and ran 4 blocks per
    multiprocessor where bf16 now runs 5 (MIN_BLOCKS). Triton's kernel, at the best of its sweep
    over tile, warps and transposition form, reached 32-54% (lowest from FP8 at 4096 tokens).
    Two earlier forms of this kernel were no faster than Triton's: a shared-memory transposition
    with each thread storing 32 bytes of one channel row, and the same in registers with 16-byte
    stores per thread; in both a warp's store touched 32 rows. Coalescing the stores was the gain.

Arithmetic is the reference's (`moeco.fp8.quantize`): s = max(amax, 1e-4) / 448 correctly rounded
(or rounded up to a power of two on the bits), q = e4m3(x / s) correctly rounded, ties to even,
FP8 input dequantized as float(q) * scale in float32. tests/test_fp8_gpu.py checks the bits
against the CPU reference for every input kind, a row map, ragged T and C, and pow2 scales.

Compiled per variant on first use with `torch.cuda._compile_kernel` (NVRTC, which ships with
PyTorch's CUDA builds; PyTorch looks for CUDA's headers under CUDA_HOME, though this source
includes none). Needs compute capability 8.9+ (the E4M3 conversion instructions). When anything
is missing the callers use the Triton kernel; MOECO_FP8_QUANT=triton forces that, =cuda requires
this one.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings

import torch

from moeco.errors import ConfigError

FP8_DTYPE = torch.float8_e4m3fn

_SOURCE = r"""
#define WARPS 8
#define TOKW 16  // tokens per warp: a block covers WARPS * TOKW = 128 tokens
#if IN_KIND == 0 || IN_KIND == 1
#define V 2      // channels per thread: one 32-bit word of input
#elif IN_KIND == 2
#define V 1
#else
#define V 4
#endif
#define TC (32 * V)  // channels per block

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

// The V channels of one 32-bit input word, as float32.
__device__ __forceinline__ void unpack(unsigned w, float *f) {
#if IN_KIND == 0
    f[0] = __uint_as_float(w << 16);
    f[1] = __uint_as_float(w & 0xFFFF0000u);
#elif IN_KIND == 1
    f[0] = f16_to_f32((unsigned short)(w & 0xFFFFu));
    f[1] = f16_to_f32((unsigned short)(w >> 16));
#elif IN_KIND == 2
    f[0] = __uint_as_float(w);
#else
    e4m3x2_to_f32((unsigned short)(w & 0xFFFFu), f[0], f[1]);
    e4m3x2_to_f32((unsigned short)(w >> 16), f[2], f[3]);
#endif
}

// x / s correctly rounded from r = 1/s (correctly rounded): Markstein's correction, two fused
// multiply-adds. The residual is taken as q*s - x and subtracted, which is the same number for
// x != 0 and keeps the sign of a zero (x = -0: q = -0, e = +0, -e*r + q = -0), so no select.
__device__ __forceinline__ float div_by(float x, float s, float r) {
    const float q = __fmul_rn(x, r);
    const float e = __fmaf_rn(q, s, -x);
    return __fmaf_rn(-e, r, q);
}

#ifdef MINB
#define BOUNDS __launch_bounds__(256, MINB)
#else
#define BOUNDS __launch_bounds__(256)
#endif
extern "C" __global__ void BOUNDS KNAME(
    const unsigned *__restrict__ x, const float *__restrict__ xs, const int *__restrict__ rows,
    unsigned char *__restrict__ q, float *__restrict__ s,
    int T_out, int C, int stride_x, int xs_st, int xs_sc, int stride_q) {
    // thread: channels c .. c + V - 1, tokens t0 .. t0 + 15; a warp reads 128 contiguous bytes of
    // each of its 16 rows, one 32-bit word per thread and row.
    __shared__ float red[WARPS * TC];
    __shared__ unsigned qs[TC * 33];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int c = blockIdx.x * TC + lane * V;
    const long long t0 = (long long)blockIdx.y * (WARPS * TOKW) + warp * TOKW;
    const bool c_ok = c < C;
    const long long wpr = (long long)stride_x / V;  // 32-bit words per row of x
    // tokens of this warp that exist, and of this thread (0 past C): each load below needs one
    // compare, and its address is a base plus j rows (pointer steps: row strides fit in 32 bits).
    const int n_tok = (int)min((long long)TOKW, max(0LL, (long long)T_out - t0));
    const int n_ok = c_ok ? n_tok : 0;
    unsigned w[TOKW];
#if GATHER || IN_KIND == 3
    // Per-token values the whole warp needs (the source row, the FP8 input's scale): lane j < 16
    // loads token j's and the others take it by a shuffle, instead of 16 broadcast loads a thread.
    int src_l = -1;
#if GATHER
    if (lane < n_tok) src_l = rows[t0 + lane];
#else
    if (lane < n_tok) src_l = (int)(t0 + lane);  // fits: at most 65535 blocks of 128 tokens
#endif
#endif
#if IN_KIND == 3
    // TC = 128: one scale column (c >> 7 == blockIdx.x) for the whole block
    const float xs_l = src_l >= 0 ? xs[(long long)src_l * xs_st + (long long)blockIdx.x * xs_sc] : 0.0f;
#define XSV(j) __shfl_sync(0xffffffffu, xs_l, (j))
#endif
#if GATHER
#pragma unroll
    for (int j = 0; j < TOKW; ++j) {
        const int src = __shfl_sync(0xffffffffu, src_l, j);
        w[j] = (c_ok && src >= 0) ? x[(long long)src * wpr + c / V] : 0u;
    }
#else
    const unsigned *xp = x + t0 * wpr + c / V;
#pragma unroll
    for (int j = 0; j < TOKW; ++j) {
        w[j] = j < n_ok ? *xp : 0u;
        xp += (int)wpr;
    }
#endif
    float amax[V];
#pragma unroll
    for (int i = 0; i < V; ++i) amax[i] = 0.0f;
#pragma unroll
    for (int j = 0; j < TOKW; ++j) {
        float f[V];
        unpack(w[j], f);
#pragma unroll
        for (int i = 0; i < V; ++i) {
#if IN_KIND == 3
            f[i] = __fmul_rn(f[i], XSV(j));
#endif
            amax[i] = fmaxf(amax[i], fabsf(f[i]));
        }
    }
#pragma unroll
    for (int i = 0; i < V; ++i) red[warp * TC + lane * V + i] = amax[i];
    __syncthreads();
    float sc[V], rc[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
        float a = red[lane * V + i];
#pragma unroll
        for (int k = 1; k < WARPS; ++k) a = fmaxf(a, red[k * TC + lane * V + i]);
        float v = __fdiv_rn(fmaxf(a, 1e-4f), 448.0f);
#if POW2
        v = __uint_as_float((__float_as_uint(v) + 0x7FFFFFu) & 0x7F800000u);
#endif
        sc[i] = v;
        rc[i] = __frcp_rn(v);
        if (warp == 0 && c_ok) s[(long long)blockIdx.y * C + c + i] = v;
    }
    // quantize this thread's 16 tokens of each channel into 4 words, then hand them to the store
    // layout through shared memory (row = channel, 32 words of 4 tokens + 1 pad word)
#pragma unroll
    for (int k = 0; k < TOKW / 4; ++k) {
        float f[4][V];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            unpack(w[4 * k + j], f[j]);
#if IN_KIND == 3
#pragma unroll
            for (int i = 0; i < V; ++i) f[j][i] = __fmul_rn(f[j][i], XSV(4 * k + j));
#endif
        }
#pragma unroll
        for (int i = 0; i < V; ++i)
            qs[(lane * V + i) * 33 + warp * (TOKW / 4) + k] =
                f32x4_to_e4m3x4(div_by(f[0][i], sc[i], rc[i]), div_by(f[1][i], sc[i], rc[i]),
                                div_by(f[2][i], sc[i], rc[i]), div_by(f[3][i], sc[i], rc[i]));
    }
    __syncthreads();
    // store: 8 threads per channel row, 16 bytes (16 tokens) each: a warp writes 4 rows x 128 bytes
    const int tid = threadIdx.x, chunk = tid & 7;
    const long long tt = (long long)blockIdx.y * (WARPS * TOKW) + 16 * chunk;
#pragma unroll
    for (int pass = 0; pass < TC / (4 * WARPS); ++pass) {
        const int row = pass * (4 * WARPS) + (tid >> 3);
        const int cg = blockIdx.x * TC + row;
        if (cg >= C) continue;
        const unsigned *src = qs + row * 33 + 4 * chunk;
        const unsigned a0 = src[0], a1 = src[1], a2 = src[2], a3 = src[3];
        unsigned char *dst = q + (long long)cg * stride_q + tt;
        if (tt + 16 <= T_out && (stride_q & 15) == 0) {
            *reinterpret_cast<uint4 *>(dst) = make_uint4(a0, a1, a2, a3);
        } else {
            const unsigned wd[4] = {a0, a1, a2, a3};
            for (int j = 0; j < 16 && tt + j < T_out; ++j) dst[j] = (unsigned char)(wd[j >> 2] >> (8 * (j & 3)));
        }
    }
}
"""

_IN_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2, FP8_DTYPE: 3}


class CompiledVariants:
    """Kernels built at first use, one per key (thread-safe). The first failed build turns the family
    off for the process, with one warning naming what is used instead: `get` then returns None and
    `broken` says why."""

    def __init__(self, what: str, instead: str):
        self.what, self.instead = what, instead
        self.cache: dict[tuple, object] = {}
        self.broken: str | None = None
        self._lock = threading.Lock()

    def get(self, key: tuple, build):
        k = self.cache.get(key)
        if k is not None or self.broken is not None:
            return k
        with self._lock:
            if key not in self.cache and self.broken is None:
                try:
                    self.cache[key] = build()
                except Exception as exc:  # no NVRTC, an old driver, a PyTorch without the helpers
                    self.broken = f"{type(exc).__name__}: {exc}"[:300]
                    warnings.warn(f"moeco: the NVRTC {self.what} did not compile ({self.broken}); using "
                                  f"{self.instead}", stacklevel=4)
        return self.cache.get(key)


_variants = CompiledVariants("token-wise FP8 kernel", "Triton's")
_libcuda = None
MAX_GRID_Y = 65535  # a CUDA grid's y (and z) dimension


def mode() -> str:
    m = os.environ.get("MOECO_FP8_QUANT", "auto").strip().lower()
    if m not in ("auto", "cuda", "triton"):
        raise ConfigError(f"MOECO_FP8_QUANT={m!r}: expected auto, cuda or triton")
    return m


_contexts: dict[int, int] = {}  # device index -> its primary context (a CUcontext as int)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


_capabilities: dict[int, tuple[int, int]] = {}


def capability(device: torch.device) -> tuple[int, int]:
    """torch.cuda.get_device_capability, asked once per device (it is on every launch's path)."""
    idx = _index(device)
    cap = _capabilities.get(idx)
    if cap is None:
        cap = _capabilities[idx] = torch.cuda.get_device_capability(idx)
    return cap


def _device_ok(device: torch.device) -> bool:
    return (device.type == "cuda" and torch.version.cuda is not None and capability(device) >= (8, 9)
            and hasattr(torch.cuda, "_compile_kernel")  # private helpers: absent -> Triton
            and hasattr(getattr(torch.cuda, "_utils", None), "_get_gpu_runtime_library"))


def _driver():
    """libcuda as PyTorch loads it, opened once (PyTorch's own kernel wrapper opens it per launch)."""
    global _libcuda
    if _libcuda is None:
        lib = torch.cuda._utils._get_gpu_runtime_library()
        lib.cuLaunchKernel.restype = ctypes.c_int
        _libcuda = lib
    return _libcuda


def _ensure_context(device: torch.device) -> None:
    """Make `device`'s primary context current on this thread, as Triton's launcher does: the kernel
    is loaded and launched through the driver API, and a thread that has made no runtime call yet
    (autograd's backward worker, for one) has no current context ("invalid device context").
    One driver call when it is current already (the usual case)."""
    lib = _driver()
    want = _index(device)
    ctx = ctypes.c_void_p()
    lib.cuCtxGetCurrent(ctypes.byref(ctx))
    if ctx.value and _contexts.get(want) == ctx.value:
        return
    dev = ctypes.c_int(-1)
    if ctx.value:
        lib.cuCtxGetDevice(ctypes.byref(dev))
    if not ctx.value or dev.value != want:
        cu_dev = ctypes.c_int()
        if lib.cuDeviceGet(ctypes.byref(cu_dev), want) or lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), cu_dev) \
                or lib.cuCtxSetCurrent(ctx):
            raise RuntimeError(f"cannot make the CUDA context of device {want} current for the NVRTC kernel")
    _contexts[want] = ctx.value


def _raw_stream(device: torch.device) -> int:
    """The current stream of `device` as a CUstream handle (what Triton's launcher reads)."""
    try:
        return torch._C._cuda_getCurrentRawStream(_index(device))
    except AttributeError:  # a PyTorch without the private helper
        return torch.cuda.current_stream(device).cuda_stream


def launch(func, grid: tuple, block: tuple, params: list, device: torch.device, smem: int = 0) -> None:
    """cuLaunchKernel of `func` (a CUfunction) on `device`'s current stream; `params` are ctypes
    objects in the kernel's parameter order (pointers as c_void_p, 32-bit ints as c_int)."""
    arr = (ctypes.c_void_p * len(params))(*[ctypes.addressof(p) for p in params])
    rc = _driver().cuLaunchKernel(func, grid[0], grid[1], grid[2], block[0], block[1], block[2], smem,
                                  ctypes.c_void_p(_raw_stream(device)), arr, None)
    if rc != 0:
        raise RuntimeError(f"moeco NVRTC kernel launch failed with CUresult {rc}")


# Blocks per multiprocessor the compiler must fit (__launch_bounds__' second argument), by input
# kind; None leaves the register count to the compiler. bf16 at 5 (48 registers instead of 59):
# 1.04-1.06x at 4096-16384 tokens on the H200 (`bench/fp8_gemm_tune.py --only minb`); 6 spills and is
# slower. The others already fit 4-6 blocks, and FP8 input measured the same at 4 and 5.
MIN_BLOCKS: dict[int, int | None] = {0: 5, 1: None, 2: None, 3: None}


def _kernel(in_kind: int, gather: bool, pow2: bool):
    """The compiled variant, or None (with one warning) when NVRTC cannot build it here."""
    minb = MIN_BLOCKS[in_kind]
    name = f"moeco_token_wise_{in_kind}{int(gather)}{int(pow2)}_{minb or 0}"
    defs = [f"-DIN_KIND={in_kind}", f"-DGATHER={int(gather)}", f"-DPOW2={int(pow2)}"]
    defs += [f"-DMINB={minb}"] if minb else []
    return _variants.get((torch.cuda.current_device(), in_kind, gather, pow2, minb),
                         lambda: torch.cuda._compile_kernel(_SOURCE.replace("KNAME", name), name, nvcc_options=defs))


def token_wise_supported(x: torch.Tensor, x_scale: torch.Tensor | None) -> bool:
    """Whether `token_wise` takes this input (else the caller uses Triton): CUDA, sm_89+, a dtype it
    reads, C a multiple of 8 with 4-byte aligned rows, and no earlier compile failure."""
    if _variants.broken is not None or x.dim() != 2 or not x.is_cuda or x.dtype not in _IN_KIND:
        return False
    if (x.dtype == FP8_DTYPE) != (x_scale is not None):
        return False
    C = x.shape[1]  # each thread reads one aligned 32-bit word per row: 4 // element_size channels
    return (C % 8 == 0 and x.stride(1) == 1 and (x.stride(0) * x.element_size()) % 4 == 0
            and x.data_ptr() % 4 == 0 and _device_ok(x.device))


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
    if tb > MAX_GRID_Y:  # one grid row per 128 tokens: more than 8.4M tokens go to Triton
        return None
    q = torch.empty((C, T_out), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((tb, C), dtype=torch.float32, device=x.device).t()
    if T_out == 0 or C == 0:
        return q, s
    _ensure_context(x.device)
    k = _kernel(_IN_KIND[x.dtype], rows is not None, pow2_scale)
    if k is None:
        return None
    if rows is not None and rows.dtype != torch.int32:
        rows = rows.to(torch.int32)
    xs, (xs_st, xs_sc) = (x_scale, x_scale.stride()) if x_scale is not None else (s, (0, 0))  # s: a placeholder
    tc = 32 * (4 // x.element_size())  # channels per block: 32 threads x one 32-bit word
    P, I = ctypes.c_void_p, ctypes.c_int
    params = [P(x.data_ptr()), P(xs.data_ptr()), P((rows if rows is not None else s).data_ptr()), P(q.data_ptr()),
              P(s.data_ptr()), I(T_out), I(C), I(x.stride(0)), I(xs_st), I(xs_sc), I(q.stride(0))]
    launch(k.func, (-(-C // tc), tb, 1), (256, 1, 1), params, x.device)
    return q, s


def status() -> str:
    """One line for logs and benches: whether the NVRTC kernels are in use, and why not."""
    if _variants.broken is not None:
        return f"cuda kernels off: {_variants.broken}"
    return f"cuda kernels: MOECO_FP8_QUANT={mode()}, compiled {len(_variants.cache)}"
