"""CUDA C kernels compiled at run time with NVRTC, where Triton's versions are the slower ones.

dual: both quantizations of a bf16 / fp16 output gradient dy (T, C) from one read of it, the 1x128
    tiles Dgrad takes and the 128x1 tiles (written transposed) Wgrad takes; see csrc/dual_quant.cu.

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

    Measured on the H200 (BENCHMARKS.md): 0.094 ms for 16384 x 7168 from bf16 (78%
    of HBM bandwidth) and 0.096 ms from FP8 (51%; 2 + 1 and 1 + 1 bytes per element); Triton's kernel,
    at the best of its sweep over tile, warps and transposition form, reaches 32-54% (lowest from FP8
    at 4096 tokens). What makes the difference: coalesced stores (a layout where a warp's store touches
    32 rows is no faster than Triton's), 32-bit address arithmetic without a select per element, and
    5 blocks per multiprocessor for bf16 input (MIN_BLOCKS).

Arithmetic is the reference's (`moeco.fp8.quantize`): s = max(amax, 1e-4) / 448 correctly rounded
(or rounded up to a power of two on the bits), q = e4m3(x / s) correctly rounded, ties to even,
FP8 input dequantized as float(q) * scale in float32. tests/test_fp8_gpu.py checks the bits
against the CPU reference for every input kind, a row map, ragged T and C, and pow2 scales.

The sources are csrc/quant_helpers.cuh (shared by both kernels), csrc/token_wise.cu and
csrc/dual_quant.cu, compiled per variant on first use with `torch.cuda._compile_kernel` (NVRTC,
which ships with PyTorch's CUDA builds; PyTorch looks for CUDA's headers under CUDA_HOME, though this source
includes none). Needs compute capability 8.9+ (the E4M3 conversion instructions). When anything
is missing the callers use the Triton kernel; a recipe's quant_kernel="triton" forces that, "cuda"
requires this one.
"""

from __future__ import annotations

import ctypes
import importlib.resources
import threading
import warnings
from types import MappingProxyType

import torch

from moeco.fp8.format import FP8_DTYPE


def _cuda_source(name: str) -> str:
    """The CUDA C text of csrc/`name`, shipped in the package."""
    return (importlib.resources.files("moeco.fp8") / "csrc" / name).read_text(encoding="utf-8")


# The helpers both quantization kernels start with (E4M3 conversions, scale_of, div_by, BOUNDS, the
# transposed store), then each kernel's own text; KNAME is replaced by the variant's name.
_HELPERS = _cuda_source("quant_helpers.cuh")

_SOURCE = _HELPERS + _cuda_source("token_wise.cu")


# Both quantizations of a 16-bit x (T, C) from one read: 1x128 tiles along C (q_row (T, C), s_row
# (T, ceil(C/128)) stored (ceil(C/128), T)) and 128-token tiles along T written transposed (q_col
# (C, T), s_col (C, ceil(T/128)) stored (ceil(T/128), C)). A block covers 128 tokens x 128 channels:
# thread (warp w, lane l) loads the 8 bytes of channels 4l .. 4l + 3 of tokens 16w .. 16w + 15 (a warp
# reads one 256-byte row segment per load). Row maxima: each thread's 16 per-token maxima are reduced
# over the warp by a halving butterfly (8 + 4 + 2 + 1 + 1 shuffles), after which lane 2j holds token
# j's; the scales go back to all lanes by shuffles. Column maxima and the transposed store are the
# token-wise kernel's (V = 4). A row-only build of it took 0.86-1.08x the time of Triton's 1x128 kernel
# on the H200 (faster only at 16384 x 576), so the forward keeps Triton's.
_DUAL_SOURCE = _HELPERS + _cuda_source("dual_quant.cu")

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
# 1.04-1.06x at 4096-16384 tokens on the H200 (`tools/fp8_gemm_tune.py --only minb`); 6 spills and is
# slower. The others already fit 4-6 blocks, and FP8 input measured the same at 4 and 5.
# Read-only: a bench that sweeps the bound passes `min_blocks` to `token_wise`.
MIN_BLOCKS = MappingProxyType({0: 5, 1: None, 2: None, 3: None})


def _kernel(in_kind: int, gather: bool, pow2: bool, minb: int | None = None):
    """The compiled variant, or None (with one warning) when NVRTC cannot build it here. `minb`: the
    register bound (blocks per multiprocessor); None takes MIN_BLOCKS[in_kind]."""
    minb = MIN_BLOCKS[in_kind] if minb is None else minb or None
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
               rows: torch.Tensor | None = None, min_blocks: int | None = None):
    """x (T, C) -> q (C, T') E4M3, s (C, ceil(T'/128)) with strides (1, C); see the module docstring.

    `x_scale` (T, ceil(C/128)), any strides: x is FP8 with 1x128 scales and is dequantized first.
    `rows` (T',) int32: output token t is x's row rows[t], a zero row where rows[t] < 0.
    `min_blocks`: the register bound, 0 for none (None: MIN_BLOCKS). The caller checks
    `token_wise_supported` first; None when the kernel cannot be compiled here.
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
    k = _kernel(_IN_KIND[x.dtype], rows is not None, pow2_scale, min_blocks)
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


_dual_variants = CompiledVariants("dual FP8 quantization kernel", "the two separate kernels")


# As MIN_BLOCKS, for `dual`, by input kind. None: bf16 takes 80 registers (3 blocks per multiprocessor);
# a bound of 2 blocks (128 registers) measured 0-11% slower, of 3 (80 registers, more spilled) -1% to +4%,
# on the H200 (`tools/fp8_gemm_tune.py --only dual`).
DUAL_MIN_BLOCKS = MappingProxyType({0: None, 1: None})


def _dual_kernel(in_kind: int, pow2: bool, minb: int | None = None):
    minb = DUAL_MIN_BLOCKS[in_kind] if minb is None else minb or None
    name = f"moeco_dual_quant_{in_kind}{int(pow2)}_{minb or 0}"
    defs = [f"-DIN_KIND={in_kind}", f"-DPOW2={int(pow2)}"] + ([f"-DMINB={minb}"] if minb else [])
    return _dual_variants.get((torch.cuda.current_device(), in_kind, pow2, minb),
                              lambda: torch.cuda._compile_kernel(_DUAL_SOURCE.replace("KNAME", name), name,
                                                                 nvcc_options=defs))


def dual_supported(x: torch.Tensor) -> bool:
    """Whether `dual` takes this input: 2-D bf16 / fp16 on CUDA sm_89+, C a multiple of 4, rows 8-byte
    aligned (each thread loads 8 bytes of a row), at most 65535 blocks of 128 tokens, no failed build."""
    if _dual_variants.broken is not None or x.dim() != 2 or not x.is_cuda:
        return False
    if x.dtype not in (torch.bfloat16, torch.float16):
        return False
    T, C = x.shape
    return (C % 4 == 0 and x.stride(1) == 1 and x.stride(0) % 4 == 0 and x.data_ptr() % 8 == 0
            and -(-T // 128) <= MAX_GRID_Y and _device_ok(x.device))


def dual(x: torch.Tensor, *, pow2_scale: bool = False, min_blocks: int | None = None):
    """x (T, C) 16-bit -> ((q (T, C), s (T, ceil(C/128))), (qt (C, T), st (C, ceil(T/128)))) from one read of x:
    what `quantize_act_1x128(x)` and `quantize_act_1x128_t(x)` return, bit for bit, in the same layouts
    (both scales outer-dim-major). `min_blocks` as for `token_wise` (None: DUAL_MIN_BLOCKS). None when
    the kernel cannot be compiled here; the caller checks `dual_supported` first."""
    T, C = x.shape
    dev = x.device
    q = torch.empty((T, C), dtype=FP8_DTYPE, device=dev)
    s = torch.empty((-(-C // 128), T), dtype=torch.float32, device=dev).t()
    tb = -(-T // 128)
    qt = torch.empty((C, T), dtype=FP8_DTYPE, device=dev)
    st = torch.empty((tb, C), dtype=torch.float32, device=dev).t()
    if T == 0 or C == 0:
        return (q, s), (qt, st)
    _ensure_context(dev)
    k = _dual_kernel(0 if x.dtype == torch.bfloat16 else 1, pow2_scale, min_blocks)
    if k is None:
        return None
    P, I = ctypes.c_void_p, ctypes.c_int
    params = [P(x.data_ptr()), P(q.data_ptr()), P(s.data_ptr()), P(qt.data_ptr()), P(st.data_ptr()), I(T), I(C),
              I(x.stride(0)), I(T)]
    launch(k.func, (-(-C // 128), tb, 1), (256, 1, 1), params, dev)
    return (q, s), (qt, st)


def status() -> str:
    """One line for logs and benches: whether the NVRTC kernels are in use, and why not."""
    if _variants.broken is not None or _dual_variants.broken is not None:
        return f"cuda kernels off: {_variants.broken or _dual_variants.broken}"
    return f"cuda kernels: compiled {len(_variants.cache) + len(_dual_variants.cache)}"
