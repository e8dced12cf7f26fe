"""Where moeco's Hopper FP8 GEMM spends its time: clocks and power, waits inside the kernel, ablations.

    PYTHONPATH=src python tools/fp8_gemm_probe.py [--only clocks,inside,ablate,quant_order]

The kernel under test is `moeco.fp8.cuda_gemm`'s 128 x 128 build, recompiled here from its source with
text edits (each edit asserts that the text it changes is still there, so a changed kernel fails
loudly instead of measuring something else). Nothing here is used by the library.

clocks      SM clock and board power (`nvidia-smi`, every 50 ms) while BF16 torch.mm, cuBLAS FP8 and
            moeco's kernel (128- and 256-row tiles) each run in a loop for ~1.2 s.
inside      an instrumented copy: per math warp, the share of time waiting for operands (the stage's
            full barrier) and for its WGMMAs; the producer's share waiting for a free stage; and, from a
            spare producer warp, the time from each TMA issue to its stage's barrier completing.
ablate      TFLOP/s of copies without the promotion, without the loads (each stage loaded once and
            reused), without both, with constant promotion factors (no scale loads), with 4 or 16
            m-tiles per group instead of 8, and with 3 or 2 stages; cuBLAS in the same run.
quant_order the 1x128 activation quantization (Triton) with the grid's fast axis on the row blocks (the
            earlier order) or on the channel blocks (the library's), over tile shapes.
"""

from __future__ import annotations

import argparse
import ctypes
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _timing import gpu_ms  # noqa: E402
from moeco.fp8 import cuda_gemm as cg
from moeco.fp8 import cuda_kernels
from moeco.fp8 import triton_kernels as tk
from moeco.fp8.gemm import fp8_gemm
from moeco.fp8.quantize import quantize_act_1x128, quantize_weight_128x128

# (tokens, K, N)
SHAPES = [(4096, 16384, 7168), (16384, 7168, 2048), (4096, 1536, 24576), (16384, 2048, 7168), (4096, 7168, 2048)]
CLOCK_SHAPES = SHAPES + [(16384, 7168, 1536), (16384, 1536, 24576), (16384, 7168, 576)]
WARPS = 12  # 384 threads
SLOTS = 4  # int64 counters per warp in the profile buffer


def _edit(src: str, old: str, new: str) -> str:
    if old not in src:
        raise RuntimeError(f"the kernel source changed; this probe's edit no longer applies: {old[:60]!r}")
    return src.replace(old, new)


def variant(*, instr=False, observe=False, nopromo=False, noload=False, noscale=False, group_m=None) -> str:
    """The kernel's source with a `prof` (int64) parameter and the requested edits."""
    s = cg.source(128)
    s = _edit(s, "int sb_k, const long long *__restrict__ kstart, int E)",
              "int sb_k, const long long *__restrict__ kstart, int E, unsigned long long *prof)")
    if instr:  # clock64 around each wait; per warp: [operand waits, WGMMA waits, total]; producer: [waits, ns, total]
        s = _edit(s, "u32 a_off) {\n    const int stage = it % STAGES;\n    bar_wait(bars + 8 * stage, (it / STAGES) & 1);",
                  "u32 a_off, long long &tf) {\n    const int stage = it % STAGES;\n"
                  "    { long long c0 = clock64(); bar_wait(bars + 8 * stage, (it / STAGES) & 1); tf += clock64() - c0; }")
        s = re.sub(r"(\n\s*issue\([^;]*)\);", r"\1, tf);", s)
        for w in ("wait_one();", "wait_all();"):
            s = _edit(s, w, "{ long long c0 = clock64(); " + w + " tw += clock64() - c0; }")
        s = _edit(s, 'asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");',
                  'asm volatile("setmaxnreg.inc.sync.aligned.u32 232;");\n        long long tf = 0, tw = 0, t0 = clock64();')
        s = _edit(s, '        if (t == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");\n    }  // math',
                  '        if (t == 0) asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");\n'
                  '        if (lane == 0) { unsigned long long *p = prof + (blockIdx.x * 12 + threadIdx.x / 32) * 4;'
                  ' p[0] = tf; p[1] = tw; p[2] = clock64() - t0; }\n    }  // math')
        s = _edit(s, 'asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");',
                  'asm volatile("setmaxnreg.dec.sync.aligned.u32 40;");\n        long long pe = 0, p0 = clock64();'
                  ' unsigned long long g0; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g0));')
        s = _edit(s, "bar_wait(empty, phase ^ 1);",
                  "{ long long c0 = clock64(); bar_wait(empty, phase ^ 1); pe += clock64() - c0; }")
        s = _edit(s, "        __syncwarp();\n    } else {",
                  "        if (threadIdx.x == 0) { unsigned long long *p = prof + (blockIdx.x * 12) * 4; unsigned long long g1;"
                  ' asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(g1)); p[0] = pe; p[1] = g1 - g0;'
                  " p[2] = clock64() - p0; }\n        __syncwarp();\n    } else {")
    if observe:  # warp 2 follows the full barriers: [sum, max, count] of issue -> complete, cycles
        s = _edit(s, "    extern __shared__ unsigned char smem_raw[];",
                  "    extern __shared__ unsigned char smem_raw[];\n    __shared__ long long t_issue[8];")
        s = _edit(s, "                    bar_expect(full, STAGE_BYTES + SB_STAGE_BYTES);",
                  "                    t_issue[stage] = clock64();\n                    bar_expect(full, STAGE_BYTES + SB_STAGE_BYTES);")
        s = _edit(s, "        __syncwarp();\n    } else {", """        if (threadIdx.x == 64) {
            long long lsum = 0, lmax = 0, n = 0; int stage = 0; u32 phase = 0;
            for (int unit = first_unit; unit < units; unit += unit_step)
                for (int kb = 0; kb < KB; ++kb) {
                    bar_wait(bars + 8 * stage, phase);
                    const long long l = clock64() - t_issue[stage];
                    lsum += l; lmax = l > lmax ? l : lmax; ++n;
                    if (++stage == STAGES) { stage = 0; phase ^= 1; }
                }
            unsigned long long *p = prof + (blockIdx.x * 12 + 1) * 4; p[0] = lsum; p[1] = lmax; p[2] = n;
        }
        __syncwarp();
    } else {""")
    if nopromo:  # the partial sums stay in the accumulator; the compiler keeps the WGMMAs (asm volatile)
        s = _edit(s, "    for (int i = 0; i < NACC; ++i) sum[i] = __fmaf_rn(acc[i], (i & 2) ? f1 : f0, sum[i]);",
                  "    if (f0 == 12345.f) for (int i = 0; i < NACC; ++i) sum[i] += acc[i];")
    if noload:  # after the first STAGES k-blocks the producer only arrives: the math reuses stale stages
        s = _edit(s, "            int stage = 0;\n", "            int stage = 0, nload = 0;\n")
        s = _edit(s, "                    bar_expect(full, STAGE_BYTES + SB_STAGE_BYTES);",
                  "                    if (nload >= STAGES) { bar_arrive(full); if (++stage == STAGES) { stage = 0; phase ^= 1; }"
                  " continue; }\n                    ++nload;\n                    bar_expect(full, STAGE_BYTES + SB_STAGE_BYTES);")
    if noscale:
        s = _edit(s, "f0 = __ldg(sa0 + (long long)kb * sa_k) * f;", "f0 = f;")
        s = _edit(s, "f1 = __ldg(sa1 + (long long)kb * sa_k) * f;", "f1 = f;")
    if group_m:
        s = _edit(s, "#define GROUP_M (8 / CLUSTER)", f"#define GROUP_M {group_m}")
    return s


class Probe:
    """A compiled variant and its launch (bf16 out, B in 128x128 blocks, one CTA per cluster)."""

    def __init__(self, name: str, src: str, *, bm: int = 128, stages: int = 4):
        defs = [f"-DBM={bm}", "-DBN=128", f"-DSTAGES={stages}", "-DOUT_F32=0", "-DCLUSTER=1", "-DROWWISE=0"]
        self.kern = torch.cuda._compile_kernel(src.replace("KNAME", name), name, compute_capability="90a",
                                               nvcc_options=defs)
        self.smem = cg._smem(128, False, stages, False, bm)
        self.bm = bm
        if cg._lib().cuFuncSetAttribute(self.kern.func, 8, self.smem) != 0:
            raise RuntimeError(f"{name}: {self.smem} bytes of shared memory refused")

    def grid(self, M: int, N: int) -> int:
        return min(-(-M // self.bm) * -(-N // 128), torch.cuda.get_device_properties(0).multi_processor_count)

    def __call__(self, a_q, a_scale, b_q, b_scale, prof):
        M, K = a_q.shape
        N = b_q.shape[0]
        out = torch.empty((M, N), dtype=torch.bfloat16, device=a_q.device)
        descs = (cg.tensor_map(a_q, self.bm), cg.tensor_map(b_q, 128), cg.tensor_map(out, 64), cg._Desc())
        ints = [ctypes.c_int(v) for v in (M, N, K, *a_scale.stride(), *b_scale.stride())]
        ptrs = [ctypes.c_void_p(t.data_ptr()) for t in (a_scale, b_scale, out, prof)]
        params = [*descs, *ptrs[:3], *ints, ctypes.c_void_p(0), ctypes.c_int(1), ptrs[3]]  # dense: no kstart, one expert
        cuda_kernels.launch(self.kern.func, (self.grid(M, N), 1, 1), (384, 1, 1), params, a_q.device, self.smem)
        return out


def _operands(T, K, N):
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
    return x, w, (*quantize_act_1x128(x), *quantize_weight_128x128(w))


def _clock_of(fn, secs: float = 1.2) -> str:
    mon = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                            "-lms", "50"], stdout=subprocess.PIPE, text=True)
    t0 = time.time()
    while time.time() - t0 < secs:
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
    mon.terminate()
    rows = [tuple(float(v) for v in line.split(",")) for line in mon.communicate()[0].splitlines() if line.strip()][4:]
    if not rows:
        return "no samples"
    return f"{sum(r[0] for r in rows) / len(rows):.0f} MHz {sum(r[1] for r in rows) / len(rows):.0f} W"


def clocks():
    for T, K, N in CLOCK_SHAPES:
        x, w, ops = _operands(T, K, N)
        fns = {"bf16": lambda: torch.mm(x, w.t()), "cuBLAS": lambda: fp8_gemm(*ops, backend="scaled_mm"),
               "wgmma": lambda: cg.fp8_gemm_nt(*ops, bn=128), "wgmma bm=256": lambda: cg.fp8_gemm_nt(*ops, bm=256)}
        print(f"clocks {T:6d} x {K:6d} x {N:6d} | " + " | ".join(f"{k} {_clock_of(f)}" for k, f in fns.items()),
              flush=True)


def inside():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    prof = torch.zeros(sms * WARPS * SLOTS, dtype=torch.int64, device="cuda")
    probes = {bm: Probe(f"probe_inside_{bm}", variant(instr=True, observe=True), bm=bm) for bm in (128, 256)}
    for T, K, N in SHAPES:
        _, _, ops = _operands(T, K, N)
        for bm, probe in probes.items():
            prof.zero_()
            probe(*ops, prof)
            torch.cuda.synchronize()
            p = prof.view(sms, WARPS, SLOTS).double().cpu()[:probe.grid(T, N)]
            total = p[:, 4:, 2]
            mhz = p[:, 0, 2].mean().item() / p[:, 0, 1].mean().item() * 1e3
            lat = p[:, 1, 0].sum().item() / p[:, 1, 2].sum().item()
            print(f"inside {T:6d} x {K:6d} x {N:6d} bm={bm} | {mhz:.0f} MHz | math warps waiting for operands "
                  f"{(p[:, 4:, 0] / total).mean().item():.1%}, for their WGMMAs {(p[:, 4:, 1] / total).mean().item():.1%}"
                  f" | producer waiting for a free stage {(p[:, 0, 0] / p[:, 0, 2]).mean().item():.1%} | TMA issue -> "
                  f"full: mean {lat:.0f} cycles ({lat / mhz * 1e3:.0f} ns), max {p[:, 1, 1].max().item():.0f}", flush=True)


def ablate():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    prof = torch.zeros(sms * WARPS * SLOTS, dtype=torch.int64, device="cuda")
    probes = {"kernel": Probe("probe_base", variant()),
              "no promotion": Probe("probe_nopromo", variant(nopromo=True)),
              "no loads": Probe("probe_noload", variant(noload=True)),
              "neither": Probe("probe_neither", variant(nopromo=True, noload=True)),
              "constant factors": Probe("probe_noscale", variant(noscale=True)),
              "4 m-tiles/group": Probe("probe_g4", variant(group_m=4)),
              "16 m-tiles/group": Probe("probe_g16", variant(group_m=16)),
              "3 stages": Probe("probe_s3", variant(), stages=3),
              "2 stages": Probe("probe_s2", variant(), stages=2)}
    for T, K, N in SHAPES:
        _, _, ops = _operands(T, K, N)
        flop = 2 * T * K * N
        line = f"ablate {T:6d} x {K:6d} x {N:6d} | cuBLAS {flop / gpu_ms(lambda: fp8_gemm(*ops, backend='scaled_mm')) / 1e9:.0f}"
        for name, probe in probes.items():
            line += f" | {name} {flop / gpu_ms(lambda: probe(*ops, prof)) / 1e9:.0f}"
        print(line + " TFLOP/s", flush=True)


if tk.HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _quant_order_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, BLOCK_M: tl.constexpr,
                            GROUPS: tl.constexpr, K_FAST: tl.constexpr, FAST_DIV: tl.constexpr):
        # the library's _quant_act_kernel (no pow2, native cast) with either grid order
        if K_FAST:
            pid_k = tl.program_id(0)
            pid_m = tl.program_id(1)
        else:
            pid_m = tl.program_id(0)
            pid_k = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_k * (128 * GROUPS) + tl.arange(0, 128 * GROUPS)
        mask = (rows < M)[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + rows.to(tl.int64)[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x3 = tl.reshape(x, (BLOCK_M, GROUPS, 128))
        s = tk._scale_from_amax(tl.max(tl.abs(x3), axis=2), False)
        v = tl.reshape(tk._div_by_scale(x3, s[:, :, None], FAST_DIV), (BLOCK_M, 128 * GROUPS))
        tl.store(q_ptr + rows.to(tl.int64)[:, None] * stride_qm + cols[None, :], v.to(q_ptr.dtype.element_ty), mask=mask)
        kbs = pid_k * GROUPS + tl.arange(0, GROUPS)
        tl.store(s_ptr + rows[:, None] + kbs[None, :] * M, s, mask=(rows < M)[:, None] & (kbs < tl.cdiv(K, 128))[None, :])


def _quant(x, block_m, groups, warps, k_fast):
    M, K = x.shape
    kb = K // 128
    q = torch.empty((M, K), dtype=torch.float8_e4m3fn, device=x.device)
    s_t = torch.empty((kb, M), dtype=torch.float32, device=x.device)
    grid = (kb // groups, -(-M // block_m))
    _quant_order_kernel[grid if k_fast else grid[::-1]](x, q, s_t, M, K, x.stride(0), q.stride(0), BLOCK_M=block_m,
                                                        GROUPS=groups, K_FAST=k_fast,
                                                        FAST_DIV=True, num_warps=warps)
    return q, s_t.t()


def quant_order():
    tiles = ((16, 2, 4), (8, 4, 4), (4, 8, 4), (32, 1, 4), (16, 4, 8), (8, 8, 8), (2, 8, 2), (4, 4, 2))
    for M, K in ((4096, 7168), (16384, 7168), (4096, 2048), (16384, 2048)):
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) * 3
        nbytes = M * K * 3 + M * (K // 128) * 4
        ref_q, ref_s = quantize_act_1x128(x)
        res = []
        for k_fast in (False, True):
            for bm, g, w in tiles:
                q, s = _quant(x, bm, g, w, k_fast)
                if not (torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(s, ref_s)):
                    raise RuntimeError(f"quant_order: {bm} x {g} x {w} differs from the library's bits")
                t = gpu_ms(lambda: _quant(x, bm, g, w, k_fast))
                res.append((nbytes / t / 1e6 / 4800, f"{'channels' if k_fast else 'rows'} first {bm} x {128 * g}, {w} warps"))
        lib = nbytes / gpu_ms(lambda: quantize_act_1x128(x)) / 1e6 / 4800
        print(f"quant_order {M:6d} x {K:5d} | library {lib:.1%} of 4.8 TB/s | "
              + " | ".join(f"{name} {f:.1%}" for f, name in sorted(res, reverse=True)), flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="clocks,inside,ablate,quant_order")
    a = p.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        print("needs a Hopper GPU (sm_90)", file=sys.stderr)
        return 2
    sections = {"clocks": clocks, "inside": inside, "ablate": ablate, "quant_order": quant_order}
    for name in a.only.split(","):
        if name not in sections:
            print(f"--only {name}: valid: {', '.join(sections)}", file=sys.stderr)
            return 2
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}", flush=True)
    for name in a.only.split(","):
        sections[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
