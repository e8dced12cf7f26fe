"""DeepSeek-V3's block-scaled FP8 GEMM as a Hopper kernel: TMA loads, WGMMA, promotion in registers.

    C (M, N) = sum over k-blocks kb of (A_kb . B_kb^T) * a_scale[:, kb] * b_scale[n // 128, kb]

A (M, K) E4M3 with 1x128 scales, B (N, K) E4M3 with 128x128 block scales, C bf16 or fp32: the
Fprop and Dgrad of `Fp8Linear` (moeco.fp8.gemm's module docstring has the layouts).

The kernel (CUDA C in csrc/fp8_gemm_wgmma.cu, compiled at first use with NVRTC for sm_90a; `wgmma`
needs the "a" target):
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

Measured on the H200 (BENCHMARKS.md): 927-1166 TFLOP/s at DeepSeek-V3's
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
      ahead of cuBLAS, so not used by `auto`. Same bits as bm=128.
    - `bn=192`: 192-wide tiles, one accumulator per math warp group (96 registers, and 96 for the sum),
      the WGMMA groups issued in turn as for bm=256; a tile spans two of B's 128-row scale blocks, so
      the promotion picks each column's factor. The default where N % 192 == 0 but N % 128 != 0 (MLA's
      N = 576: 1.09x / 1.43x BF16 at 4096 / 16384 tokens against 0.87x / 1.31x with 128-wide tiles);
      0.84-0.98x the 128-wide tiles elsewhere (`tile_width`).
    - `grouped` (`fp8_grouped_wgrad_nt`): the routed experts' Wgrad in one launch. The per-row form over
      E experts that share the token dimension: expert e reduces over its own 128-token blocks (each
      expert's tokens start on a 128-token boundary, `triton_kernels.grouped_wgrad_operands`), read
      from a device array, so no host sync; work units are (expert, output tile), the output is
      (E M, N) rows. On the H200 the GEMM alone runs 1.16-1.52x Triton's grouped kernel and 1.03-1.16x
      BF16 `_grouped_mm` (BENCHMARKS.md), so it is the default on Hopper.
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

import torch

from moeco.fp8 import cuda_kernels
from moeco.fp8.format import FP8_DTYPE
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


_SOURCE = cuda_kernels._cuda_source("fp8_gemm_wgmma.cu")  # WGMMA_ASM and KNAME filled in per variant


def source(bn: int) -> str:
    """The kernel's CUDA C with its m64n{bn}k32 WGMMA; the caller defines BM, BN, STAGES, OUT_F32, CLUSTER,
    ROWWISE and replaces KNAME (`_kernel`)."""
    return _SOURCE.replace("WGMMA_ASM", _wgmma_asm(bn))


# --------------------------------------------------------------------------------------------------
# Host side: the driver's tensor-map encoder, the compiled variants, the launch.

_variants = cuda_kernels.CompiledVariants("FP8 GEMM", "cuBLAS")
_prototypes_set = False
_SMEM_LIMIT = 227 * 1024


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
# up to 10% slower, 3 stages 5-18%); it fits every variant's shared memory.
# 128-wide tiles: 64-wide ones measure 0.69-1.07x BF16 where 128 gives 0.82-1.44x (same run).
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
    1.09x / 1.43x BF16), else 128 (192-wide tiles measure 0.84-0.98x the 128-wide ones where N % 128 == 0;
    BENCHMARKS.md)."""
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
    return f"wgmma gemm: compiled {len(_variants.cache)}"
