"""Sweeps for the FP8 fast paths on one GPU: which kernel and tile wins at DeepSeek-V3 shapes.

    PYTHONPATH=src python tools/fp8_gemm_tune.py [--only probe,n576,gemm,quant,grouped,retile,retile_moe,minb,dual,div,linear,fbgemm,wgmma,gwgrad] [--json F]

probe   which block-wise layouts torch._scaled_mm takes on this torch/GPU: 1x128 x 1x128 (Wgrad) and
        128x128 x 1x128 (the N = 576 GEMM computed transposed), each checked against the reference.
gemm    per shape: bf16 torch.mm, torch._scaled_mm called directly (operands laid out beforehand),
        moeco's pointer-based Triton kernel, and the TMA kernel over tile configurations.
quant   1x128 quantization over block_m x groups x warps (block_m rows x groups tiles of 128
        channels per program).
grouped 32 experts x 512 tokens: the grouped Fprop / Dgrad / Wgrad kernels, pointer vs TMA, over tiles.
retile  the 128x1 (token-wise, Wgrad) quantization over channel tile, warps and store form.
retile_moe  the same at the `small` preset's grouped-Wgrad shapes, through the padded row map.
minb    the NVRTC token-wise kernel over its register bound (`token_wise(min_blocks=...)`).
dual    dy's 1x128 and 128x1 tilings from one read (`cuda_kernels.dual`) vs the two kernels.
div     the quantization kernels with x / s by reciprocal + Markstein's correction vs div_rn.
linear  Fp8Linear forward + backward under the profiler: GPU time per kernel family, per shape.
n576    the N = 576 GEMM and its Dgrad by every route (transposed / padded cuBLAS, TMA Triton).
fbgemm  FBGEMM's CUTLASS groupwise FP8 GEMMs (pip fbgemm-gpu-genai, if installed): dense and grouped.
wgmma   moeco's Hopper GEMM (moeco.fp8.cuda_gemm) over pipeline stages and one vs two-CTA clusters,
        against bf16 and cuBLAS: Fprop-like (128x128 weight blocks, bf16 out) at every shape, and
        Wgrad (dy^T . x, both 128x1-quantized, per-row scales for B, fp32 out).
gwgrad  the routed experts' Wgrad: moeco's Hopper kernel vs Triton's grouped kernel vs BF16 _grouped_mm.
GPU times come from CUDA-graph replays with the L2 flushed before each call (bench/_timing.py: no
host cost); `eager` columns are triton's do_bench on the Python call. Ratios are against the bf16
row of the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from _timing import gpu_ms, host_ms  # noqa: E402
from moeco.fp8 import cuda_kernels as ck
from moeco.fp8 import triton_kernels as tk
from moeco.fp8.gemm import fp8_gemm, fp8_gemm_reference, fp8_gemm_scaled_mm
from moeco.fp8.grouped_wgrad import fp8_grouped_wgrad, grouped_wgrad_operands
from moeco.fp8.quantize import quantize_act_1x128, quantize_weight_128x128

SHAPES = [(7168, 2048), (2048, 7168), (7168, 1536), (1536, 24576), (7168, 576), (16384, 7168)]
TMA_CONFIGS = [  # block_m, block_n, num_warps, num_stages, persistent
    (128, 128, 8, 4, True), (128, 128, 8, 3, True), (128, 128, 8, 4, False), (256, 128, 8, 3, True),
]


def rel(out, ref) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def probe_rows():
    rows = []
    T, N, K = 1024, 768, 2048
    a = torch.randn(N, T, device="cuda")
    b = torch.randn(K, T, device="cuda")
    aq, sa = tk.quantize_act_1x128(a)  # Wgrad: both operands tiled along the tokens (here the last dim)
    bq, sb = tk.quantize_act_1x128(b)
    ref = fp8_gemm_reference(aq, sa, bq, sb)
    for out_dtype in (torch.float32, torch.bfloat16):
        try:
            out = torch._scaled_mm(aq, bq.t(), scale_a=sa, scale_b=sb.t(),
                                   out_dtype=out_dtype)
            r = dict(case=f"1x128 x 1x128 out {out_dtype}", ok=True, rel_err=rel(out, ref))
        except Exception as exc:  # report what this torch refuses
            r = dict(case=f"1x128 x 1x128 out {out_dtype}", ok=False, error=f"{exc!r:.300}")
        rows.append(r)
        print("probe", r, flush=True)
    # Wgrad at a V3 shape: dW (N, K) = gy^T (N, T) . x^T (K, T)^T, fp32 out; cuBLAS vs the TMA kernel.
    for T in (4096, 16384):
        N, K = 2048, 7168
        gt = torch.randn(N, T, device="cuda", dtype=torch.bfloat16)
        xt = torch.randn(K, T, device="cuda", dtype=torch.bfloat16)
        t_bf = gpu_ms(lambda: torch.mm(gt, xt.t()))
        gq, gs = tk.quantize_act_1x128(gt)
        xq_, xs_ = tk.quantize_act_1x128(xt)
        r = dict(case=f"wgrad T={T} N={N} K={K}", bf16_ms=t_bf)
        for name, fn in (("cublas", lambda: torch._scaled_mm(gq, xq_.t(), scale_a=gs, scale_b=xs_.t(),
                                                              out_dtype=torch.float32)),
                         ("tma", lambda: tk.fp8_gemm_nt_tma(gq, gs, xq_, xs_, torch.float32)),
                         ("tma_128x256", lambda: tk.fp8_gemm_nt_tma(gq, gs, xq_, xs_, torch.float32, block_n=256,
                                                                    num_stages=3))):
            try:
                t = gpu_ms(fn)
                r[name + "_ms"], r[name + "_x"] = t, t_bf / t
            except Exception as exc:
                r[name] = f"failed: {exc!r:.200}"
        rows.append(r)
        print("probe", r, flush=True)
    # Dgrad of the N = 576 Linear: dx (T, K) = dy (T, 576) . W (576, K): a reduction of 5 k-blocks.
    for T in (4096, 16384):
        K = 7168
        gy = torch.randn(T, 576, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(576, K, device="cuda", dtype=torch.bfloat16)
        t_bf = gpu_ms(lambda: torch.mm(gy, w))
        gq, gs = tk.quantize_act_1x128(gy)
        wq, ws, wtq = tk.quantize_weight_128x128(w.float(), transposed=True)
        wst = ws.t().contiguous()
        ref = fp8_gemm_reference(gq, gs, wtq, wst)
        r = dict(case=f"dgrad N=576 T={T} K={K}", bf16_ms=t_bf)
        for mode in ("expand", "pad"):
            fn = lambda: fp8_gemm_scaled_mm(gq, gs, wtq, wst, torch.bfloat16, unaligned_k=mode)  # noqa: E731
            t = gpu_ms(fn)
            r[mode + "_ms"], r[mode + "_x"], r[mode + "_err"] = t, t_bf / t, rel(fn(), ref)
        rows.append(r)
        print("probe", r, flush=True)
    # N = 576 transposed: C^T (N, T) = W (N, K) . x (T, K)^T; W has 128x128 blocks, x 1x128 tiles.
    T, N, K = 4096, 576, 7168
    x = torch.randn(T, K, device="cuda")
    w = torch.randn(N, K, device="cuda")
    xq, xs = tk.quantize_act_1x128(x)
    wq, ws = quantize_weight_128x128(w)
    ref = fp8_gemm_reference(xq, xs, wq, ws)
    xs_rm = xs.contiguous()  # (T, KB) row-major
    for name, sa_, sb_ in (("ws (NB,KB) contiguous, xs^T (KB,T)", ws, xs_rm.t()),
                           ("ws (NB,KB) contiguous, xs^T contiguous", ws, xs_rm.t().contiguous()),
                           ("ws outer-major, xs^T (KB,T)", ws.t().contiguous().t(), xs_rm.t()),
                           ("ws outer-major, xs^T contiguous", ws.t().contiguous().t(), xs_rm.t().contiguous())):
        try:
            out = torch._scaled_mm(wq, xq.t(), scale_a=sa_, scale_b=sb_, out_dtype=torch.bfloat16)
            err = rel(out.t(), ref)
            t = gpu_ms(lambda: torch._scaled_mm(wq, xq.t(), scale_a=sa_, scale_b=sb_, out_dtype=torch.bfloat16))
            r = dict(case=f"N=576 transposed: {name}", ok=err < 1e-2, rel_err=err, ms=t,
                     tflops=2 * T * N * K / t / 1e9)
        except Exception as exc:
            r = dict(case=f"N=576 transposed: {name}", ok=False, error=f"{exc!r:.300}")
        rows.append(r)
        print("probe", r, flush=True)
    return rows


def n576_rows(tokens):
    """The N = 576 GEMM (MLA's KV down-projection) and its Dgrad (a 576-deep reduction), every route."""
    rows = []
    K, N = 7168, 576
    for T in tokens:
        x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
        gy = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
        xq, xs = quantize_act_1x128(x)
        gq, gs = quantize_act_1x128(gy)
        wq, ws, wtq = tk.quantize_weight_128x128(w.float(), transposed=True)
        wst = ws.t().contiguous()
        r = dict(T=T)
        routes = {
            "fprop bf16": lambda: torch.mm(x, w.t()),
            "fprop scaled_mm transposed": lambda: fp8_gemm_scaled_mm(xq, xs, wq, ws, torch.bfloat16),
            "fprop scaled_mm padded": lambda: fp8_gemm_scaled_mm(xq, xs, wq, ws, torch.bfloat16, unaligned_n="pad"),
            "fprop triton tma": lambda: tk.fp8_gemm_nt_tma(xq, xs, wq, ws, torch.bfloat16),
            "dgrad bf16": lambda: torch.mm(gy, w),
            "dgrad scaled_mm expand": lambda: fp8_gemm_scaled_mm(gq, gs, wtq, wst, torch.bfloat16),
            "dgrad scaled_mm pad": lambda: fp8_gemm_scaled_mm(gq, gs, wtq, wst, torch.bfloat16, unaligned_k="pad"),
            "dgrad triton tma": lambda: tk.fp8_gemm_nt_tma(gq, gs, wtq, wst, torch.bfloat16),
        }
        for name, fn in routes.items():
            try:
                g, h = gpu_ms(fn), host_ms(fn)
            except Exception as exc:
                r[name] = f"failed: {exc!r:.200}"
                print(f"n576 T={T} {name}: failed {exc!r:.200}", flush=True)
                continue
            r[name] = dict(gpu_ms=g, host_ms=h)
            base = r["fprop bf16" if name.startswith("fprop") else "dgrad bf16"]
            print(f"n576 T={T:6d} {name:28s} | GPU {g:.4f} ms {base['gpu_ms'] / g:.2f}x | eager {h:.4f} ms "
                  f"{base['host_ms'] / h:.2f}x | {2 * T * K * N / g / 1e9:5.0f} TF", flush=True)
        rows.append(r)
    return rows


def gemm_rows(tokens):
    rows = []
    for T in tokens:
        for K, N in SHAPES:
            flop = 2 * T * K * N
            tf = lambda ms: flop / ms / 1e9  # noqa: E731
            x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
            t_bf = gpu_ms(lambda: torch.mm(x, w.t()))
            xq, xs = quantize_act_1x128(x)
            wq, ws = quantize_weight_128x128(w)
            ref = fp8_gemm(xq, xs, wq, ws, torch.bfloat16, backend="scaled_mm")
            r = dict(T=T, K=K, N=N, bf16_ms=t_bf, bf16_tflops=tf(t_bf))
            if N % 128 == 0:  # the bare cuBLAS call, its operands already in the layout it wants
                t = gpu_ms(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), out_dtype=torch.bfloat16))
                r.update(cublas_ms=t, cublas_x=t_bf / t)
            # the weight's 128x128 scales given as 1x128 rows (each row carries its block's scale): the
            # same numbers through cuBLAS's 1x128 x 1x128 kernel, which may also take N = 576 unpadded
            sb_rows = ws.repeat_interleave(128, 0)[:N].t().contiguous()
            try:
                out = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=sb_rows, out_dtype=torch.bfloat16)
                r["cublas_rows_err"] = rel(out, ref)
                t = gpu_ms(lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=sb_rows, out_dtype=torch.bfloat16))
                r.update(cublas_rows_ms=t, cublas_rows_x=t_bf / t)
            except Exception as exc:  # a layout this torch/cuBLAS refuses
                r["cublas_rows"] = f"failed: {exc!r:.200}"
            t = gpu_ms(lambda: fp8_gemm(xq, xs, wq, ws, torch.bfloat16, backend="scaled_mm"))
            r.update(scaled_mm_ms=t, scaled_mm_x=t_bf / t)
            t = gpu_ms(lambda: tk.fp8_gemm_nt(xq, xs, wq, ws, torch.bfloat16))
            r.update(triton_ms=t, triton_x=t_bf / t)
            best = None
            for bm, bn, nw, ns, pers in TMA_CONFIGS:
                kw = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns, persistent=pers)
                key = f"tma_{bm}x{bn}_w{nw}_s{ns}{'_p' if pers else ''}"
                try:
                    out = tk.fp8_gemm_nt_tma(xq, xs, wq, ws, torch.bfloat16, **kw)
                    err = rel(out, ref)
                    t = gpu_ms(lambda: tk.fp8_gemm_nt_tma(xq, xs, wq, ws, torch.bfloat16, **kw))
                except Exception as exc:  # a config that does not compile or fit
                    r[key] = f"failed: {exc!r:.200}"
                    continue
                r[key + "_ms"], r[key + "_err"] = t, err
                if err < 2e-2 and (best is None or t < best[0]):
                    best = (t, key)
            if best:
                r.update(tma_best=best[1], tma_best_ms=best[0], tma_best_x=t_bf / best[0], tma_best_tflops=tf(best[0]))
            rows.append(r)
            print(f"gemm T={T:6d} K={K:6d} N={N:6d} | bf16 {t_bf:.3f} ms {tf(t_bf):5.0f} TF | cublas "
                  f"{r.get('cublas_ms', float('nan')):.3f} {r.get('cublas_x', float('nan')):.2f}x | B as rows "
                  f"{r.get('cublas_rows_ms', float('nan')):.3f} {r.get('cublas_rows_x', float('nan')):.2f}x "
                  f"err {r.get('cublas_rows_err', float('nan')):.1e} | wrapper "
                  f"{r['scaled_mm_ms']:.3f} {r['scaled_mm_x']:.2f}x | triton {r['triton_x']:.2f}x | TMA best "
                  f"{r.get('tma_best', '-')} {r.get('tma_best_ms', float('nan')):.3f} ms "
                  f"{r.get('tma_best_tflops', float('nan')):5.0f} TF {r.get('tma_best_x', float('nan')):.2f}x",
                  flush=True)
            for k, v in r.items():
                if k.startswith("tma_") and (k.endswith("_ms") or isinstance(v, str)) and k != "tma_best_ms":
                    print(f"    {k} {v if isinstance(v, str) else f'{v:.3f} ms {t_bf / v:.2f}x'}", flush=True)
            del x, w, xq, xs, wq, ws, ref
    return rows


def quant_rows(tokens):
    rows = []
    c = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    d = torch.empty_like(c)
    copy_gbs = 2 * c.numel() / gpu_ms(lambda: d.copy_(c)) / 1e6
    del c, d
    print(f"device copy {copy_gbs:.0f} GB/s", flush=True)
    for T in tokens:
        for C in (7168, 2048):
            x = torch.randn(T, C, device="cuda", dtype=torch.bfloat16)
            nbytes = T * C * 3 + T * (C // 128) * 4
            res = []
            for bm in (8, 16, 32):
                for g in (1, 2, 4):
                    for nw in (4, 8):
                        t = gpu_ms(lambda: tk.quantize_act_1x128(x, block_m=bm, groups=g, num_warps=nw))
                        res.append((nbytes / t / 1e6, f"block_m={bm} groups={g} warps={nw}", t))
            best = max(res)
            base = next(r for r in res if r[1] == "block_m=8 groups=4 warps=4")
            rows.append(dict(kind="row", T=T, C=C, best=best[1], best_ms=best[2], best_gbs=best[0],
                             default_ms=base[2], default_gbs=base[0], copy_gbs=copy_gbs,
                             all={name: t for _, name, t in res}))
            print(f"row  T={T:6d} C={C:5d} | best {best[1]:28s} {best[2]:.4f} ms {best[0]:5.0f} GB/s "
                  f"{best[0] / 4800:4.0%} of 4.8 TB/s | default {base[2]:.4f} ms {base[0]:5.0f} GB/s "
                  f"{base[0] / 4800:4.0%}", flush=True)
            del x
    return rows


def div_rows(tokens):
    """The quantization kernels with x / s as Markstein's correction from one reciprocal per scale
    (`fast_div=True`, the default) against div_rn per element, same run, same inputs."""
    rows = []
    for T in tokens:
        x = torch.randn(T, 7168, device="cuda", dtype=torch.bfloat16)
        xq, xs = tk.quantize_act_1x128(x)
        w = torch.randn(7168, 2048, device="cuda")
        cases = (("1x128 from bf16", lambda fast: tk.quantize_act_1x128(x, fast_div=fast), T * 7168 * 3),
                 # control: the 128x1 kernel divides with div_rn either way (Markstein measured
                 # 0.90-0.99x there), so this row shows the run's noise
                 ("128x1 from fp8 (control)", lambda fast: tk.quantize_act_1x128_t(xq, xs), T * 7168 * 2),
                 ("weight 128x128 + W^T, fp32",
                  lambda fast: tk.quantize_weight_128x128(w, transposed=True, fast_div=fast), w.numel() * 6))
        for name, fn, nbytes in cases:
            t = {}
            for fast in (False, True):
                t[fast] = gpu_ms(lambda: fn(fast))
            rows.append(dict(T=T, case=name, div_rn_ms=t[False], markstein_ms=t[True], speedup=t[False] / t[True]))
            print(f"div T={T:6d} {name:28s} | div_rn {t[False]:.4f} ms {nbytes / t[False] / 1e6:5.0f} GB/s | "
                  f"reciprocal+Markstein {t[True]:.4f} ms {nbytes / t[True] / 1e6:5.0f} GB/s | "
                  f"{t[False] / t[True]:.2f}x", flush=True)
        del x, xq, xs, w
    return rows


def retile_moe_rows():
    """The grouped Wgrad's two 128x1 quantizations at the `small` preset's expert shapes (16384 tokens
    x 6 routed = 98304 rows over 64 experts, read through the padded row map as in
    `fp8_grouped_wgrad`): gy (rows x 1536) from bf16, x (rows x 1536 and x 768) from FP8, over channel
    tile x warps x store form; and the NVRTC kernel on the same input."""
    rows = []
    E, R = 64, 98304
    gen = torch.Generator().manual_seed(0)
    counts = torch.multinomial(torch.ones(E), R, replacement=True, generator=gen).bincount(minlength=E)
    offs = counts.cumsum(0).to(torch.int32).cuda()
    dest, _, Tp = tk.grouped_padded_rows(offs, R)
    src = torch.full((Tp,), -1, dtype=torch.int32, device="cuda")
    src.scatter_(0, dest, torch.arange(R, dtype=torch.int32, device="cuda"))
    for C, from_fp8 in ((1536, False), (1536, True), (768, True)):
        x = torch.randn(R, C, device="cuda", dtype=torch.bfloat16)
        args = tk.quantize_act_1x128(x) if from_fp8 else (x,)
        nbytes = Tp * C * (2 if from_fp8 else 3)
        res = []
        for bc in (32, 64):
            for nw in (4, 8):
                for trans in (False, True):
                    t = gpu_ms(lambda: tk.quantize_act_1x128_t(*args, rows=src, block_c=bc, num_warps=nw,
                                                               trans_store=trans))
                    res.append((t, f"block_c={bc} warps={nw} trans={int(trans)}"))
        base = next(t for t, n in res if n == "block_c=32 warps=4 trans=1")
        best = min(res)
        t_cuda = gpu_ms(lambda: ck.token_wise(*args, rows=src))
        rows.append(dict(C=C, src="fp8" if from_fp8 else "bf16", default_ms=base, best_ms=best[0], best=best[1],
                         all={n: t for t, n in res}, nvrtc_ms=t_cuda))
        print(f"retile_moe rows={Tp} C={C:5d} {'fp8 ' if from_fp8 else 'bf16'} | default {base:.4f} ms "
              f"{nbytes / base / 1e6:5.0f} GB/s | best {best[1]} {best[0]:.4f} ms | NVRTC {t_cuda:.4f} ms "
              f"{nbytes / t_cuda / 1e6:5.0f} GB/s ({nbytes / t_cuda / 4.8e9:.0%}) {base / t_cuda:.2f}x | "
              + " ".join(f"{n.replace('block_c=', 'c').replace(' warps=', 'w').replace(' trans=', 't')}:{t * 1e3:.0f}"
                         for t, n in res), flush=True)
        del x, args
    return rows


def retile_rows():
    """The 128x1 (token-wise) quantization for Wgrad, from bf16 and from the saved FP8 tiles, over
    channel tile x warps x store form (transposed fp32 pointer store, or the fp8 tile transposed first);
    and the NVRTC kernel (`moeco.fp8.cuda_kernels.token_wise`) on the same input."""
    rows = []
    for T, C in ((4096, 7168), (16384, 7168), (16384, 2048)):
        x = torch.randn(T, C, device="cuda", dtype=torch.bfloat16)
        xq, xs = tk.quantize_act_1x128(x)
        kb, tb = -(-C // 128), -(-T // 128)
        t_tr = gpu_ms(lambda: x.t().contiguous())  # a plain transposed copy: the layout change alone
        print(f"retile T={T:6d} C={C:5d} transpose copy (bf16, torch) {t_tr:.4f} ms "
              f"{4 * T * C / t_tr / 1e6:5.0f} GB/s ({4 * T * C / t_tr / 4.8e9:.0%})", flush=True)
        for src, args, nbytes in (("bf16", (x,), T * C * 3), ("fp8", (xq, xs), T * C * 2 + T * kb * 4)):
            nbytes += C * tb * 4
            res = []
            for bc in (32, 64, 128):
                for nw in (4, 8):
                    for trans in (False, True):
                        try:
                            t = gpu_ms(lambda: tk.quantize_act_1x128_t(*args, block_c=bc, num_warps=nw,
                                                                       trans_store=trans))
                        except Exception as exc:
                            print(f"retile block_c={bc} warps={nw} trans={trans}: failed {exc!r:.150}", flush=True)
                            continue
                        res.append((nbytes / t / 1e6, f"block_c={bc} warps={nw} trans={int(trans)}", t))
            best = max(res)
            base = next(r for r in res if r[1] == "block_c=32 warps=4 trans=1")
            t_cuda = gpu_ms(lambda: ck.token_wise(*args))
            rows.append(dict(T=T, C=C, src=src, best=best[1], best_ms=best[2], best_gbs=best[0], default_ms=base[2],
                             all={name: t for _, name, t in res}, nvrtc_ms=t_cuda))
            print(f"retile T={T:6d} C={C:5d} {src:4s} | best {best[1]:30s} {best[2]:.4f} ms {best[0]:5.0f} GB/s | "
                  f"default {base[2]:.4f} ms {base[0]:5.0f} GB/s | NVRTC {t_cuda:.4f} ms {nbytes / t_cuda / 1e6:5.0f} "
                  f"GB/s ({nbytes / t_cuda / 4.8e9:.0%}) {base[2] / t_cuda:.2f}x | "
                  + " ".join(f"{n.replace('block_c=', 'c').replace(' warps=', 'w').replace(' trans=', 't')}:{t * 1e3:.0f}"
                             for _, n, t in res), flush=True)
        del x, xq, xs
    return rows


def minb_rows():
    """The NVRTC token-wise kernel over its register bound (`min_blocks`: blocks per multiprocessor the
    compiler must fit; 0 = its own choice; cuda_kernels.MIN_BLOCKS ships the best), bf16 and FP8 input,
    three repeats in turn; every variant's output is checked equal to the first's."""
    rows = []
    for T, C in ((4096, 7168), (16384, 7168), (16384, 2048)):
        x = torch.randn(T, C, device="cuda", dtype=torch.bfloat16)
        xq, xs = tk.quantize_act_1x128(x)
        xs = xs.t().contiguous().t()  # the forward's outer-dim-major scales, as Fp8Linear saves them
        for src, args, kind, nbytes in (("bf16", (x,), 0, T * C * 3), ("fp8", (xq, xs), 3, T * C * 2)):
            times, ref = {}, None
            for _ in range(3):
                for minb in (0, 4, 5, 6):
                    q, s = ck.token_wise(*args, min_blocks=minb)
                    if ref is None:
                        ref = (q.view(torch.uint8).clone(), s.clone())
                    assert torch.equal(q.view(torch.uint8), ref[0]) and torch.equal(s, ref[1]), minb
                    times.setdefault(minb, []).append(gpu_ms(lambda: ck.token_wise(*args, min_blocks=minb)))
            best = {m: min(v) for m, v in times.items()}
            rows.append(dict(T=T, C=C, src=src, ms=best))
            print(f"minb T={T:6d} C={C:5d} {src:4s} | " + " | ".join(
                f"{m or 'free'}: {t * 1e3:6.1f} us ({nbytes / t / 4.8e9:.1%})" for m, t in best.items()), flush=True)
        del x, xq, xs
    return rows


def dual_rows(tokens):
    """dy's two tilings (Dgrad's 1x128, Wgrad's 128x1) from one read (`cuda_kernels.dual`) against the
    two kernels Fp8Linear ran before (Triton's 1x128, the NVRTC token-wise), over the dual kernel's
    register bound (`dual(min_blocks=...)`), and Triton's 1x128 kernel alone for scale. Three
    repeats in turn, best kept; outputs checked equal. % of 4.8 TB/s; bytes: 2 read + 2 written per
    element for both tilings, 2 + 1 for one (scales not counted)."""
    rows = []
    for T in tokens:
        for C in sorted({n for _, n in SHAPES} | {7168}):
            x = torch.randn(T, C, device="cuda", dtype=torch.bfloat16)
            (q0, s0), (qt0, st0) = tk.quantize_act_1x128(x), ck.token_wise(x)
            times = {}
            for _ in range(3):
                two_kernels = lambda: (tk.quantize_act_1x128(x), ck.token_wise(x))  # noqa: E731
                times.setdefault("separate", []).append(gpu_ms(two_kernels))
                for minb in (0, 2, 3):
                    (q, s), (qt, st) = ck.dual(x, min_blocks=minb)
                    assert torch.equal(q.view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s, s0)
                    assert torch.equal(qt.view(torch.uint8), qt0.view(torch.uint8)) and torch.equal(st, st0)
                    times.setdefault(f"dual {minb or 'free'}", []).append(
                        gpu_ms(lambda: ck.dual(x, min_blocks=minb)))
                times.setdefault("triton 1x128", []).append(gpu_ms(lambda: tk.quantize_act_1x128(x)))
            best = {k: min(v) for k, v in times.items()}
            rows.append(dict(T=T, C=C, ms=best))
            two, one = T * C * 4, T * C * 3
            print(f"dual T={T:6d} C={C:5d} | " + " | ".join(
                f"{k}: {t * 1e3:6.1f} us ({(one if k.startswith('triton') else two) / t / 4.8e9:.1%})"
                for k, t in best.items()), flush=True)
            del x
    return rows


FAMILIES = (("scaled_mm / cuBLAS", ("gemm", "sm90_xmma", "cutlass", "nvjet")), ("triton GEMM", ("fp8_gemm",)),
            ("quant rows", ("_quant_act_kernel",)), ("quant tokens", ("_quant_act_t_kernel",)),
("quant weight", ("_quant_weight",)))


def family(name: str) -> str:
    for fam, keys in FAMILIES:
        if any(k in name for k in keys):
            return fam
    return "other"


def linear_rows(tokens):
    from torch.profiler import ProfilerActivity, profile

    from moeco.fp8 import Fp8Linear

    rows = []
    for T in tokens:
        for K, N in SHAPES:
            x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            gy = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
            m = Fp8Linear(K, N, device="cuda")
            for _ in range(3):
                m(x).backward(gy)
            torch.cuda.synchronize()
            reps = 5
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(reps):
                    m.weight.grad = None
                    x.grad = None
                    m(x).backward(gy)
                torch.cuda.synchronize()
            per = {}
            names = {}
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    f = family(e.name)
                    per[f] = per.get(f, 0.0) + e.device_time / 1000 / reps
                    names.setdefault(f, set()).add(e.name[:80])
            total = sum(per.values())
            rows.append(dict(T=T, K=K, N=N, total_ms=total, per_family_ms=per,
                             names={k: sorted(v) for k, v in names.items()}))
            print(f"linear T={T:6d} K={K:6d} N={N:6d} | kernels {total:.3f} ms | "
                  + " | ".join(f"{k} {v:.3f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])), flush=True)
            del x, gy, m
    return rows


GROUPED_CONFIGS = [(128, 128, 8, 4), (128, 128, 8, 3), (128, 128, 8, 5)]


def grouped_rows():
    """32 experts x 512 tokens (V3 shapes): the grouped kernels, pointer vs TMA, vs bf16 _grouped_mm."""
    rows = []
    E, D, Fh, T = 32, 7168, 2048, 16384
    offs = torch.full((E,), T // E, dtype=torch.int32, device="cuda").cumsum(0).to(torch.int32)
    for name, (N, K) in (("gate/up (E,2048,7168)", (Fh, D)), ("down (E,7168,2048)", (D, Fh))):
        flop = 2 * T * K * N
        x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        gy = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
        t_bf = gpu_ms(lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs))
        t_bf_d = gpu_ms(lambda: torch._grouped_mm(gy, w, offs=offs))
        gyt, xt = gy.t().contiguous(), x.t().contiguous()
        t_bf_w = gpu_ms(lambda: torch._grouped_mm(gyt, xt.t(), offs=offs))
        xq, xs = quantize_act_1x128(x)
        gq, gs = quantize_act_1x128(gy)
        wq, ws, wtq = tk.quantize_weight_128x128(w.float(), transposed=True)
        wst = ws.transpose(1, 2)
        r = dict(shape=name, bf16_fprop_ms=t_bf, bf16_dgrad_ms=t_bf_d, bf16_wgrad_ms=t_bf_w)
        ref_f = tk.fp8_grouped_gemm_nt(xq, xs, wq, ws, offs, torch.float32, tma=False)
        ref_d = tk.fp8_grouped_gemm_nt(gq, gs, wtq, wst, offs, torch.float32, tma=False)
        for bm, bn, nw, ns in GROUPED_CONFIGS:
            kw = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
            for tma in (False, True):
                key = f"{'tma' if tma else 'ptr'}_{bm}x{bn}_w{nw}_s{ns}"
                try:
                    ef = rel(tk.fp8_grouped_gemm_nt(xq, xs, wq, ws, offs, torch.float32, tma=tma, **kw), ref_f)
                    ed = rel(tk.fp8_grouped_gemm_nt(gq, gs, wtq, wst, offs, torch.float32, tma=tma, **kw), ref_d)
                    tf_ = gpu_ms(lambda: tk.fp8_grouped_gemm_nt(xq, xs, wq, ws, offs, torch.bfloat16, tma=tma, **kw))
                    td = gpu_ms(lambda: tk.fp8_grouped_gemm_nt(gq, gs, wtq, wst, offs, torch.bfloat16, tma=tma, **kw))
                    tw = gpu_ms(lambda: fp8_grouped_wgrad(gy, xq, xs, offs, E, tma=tma, gemm="triton", **kw))
                except Exception as exc:
                    r[key] = f"failed: {exc!r:.200}"
                    print(f"grouped {name} {key}: failed {exc!r:.200}", flush=True)
                    continue
                r[key] = dict(fprop_ms=tf_, dgrad_ms=td, wgrad_incl_quant_ms=tw, err_f=ef, err_d=ed)
                print(f"grouped {name:22s} {key:20s} | fprop {tf_:.3f} ms {flop / tf_ / 1e9:5.0f} TF "
                      f"{t_bf / tf_:.2f}x | dgrad {td:.3f} {t_bf_d / td:.2f}x | wgrad+quant {tw:.3f} "
                      f"{t_bf_w / tw:.2f}x | err vs ptr {ef:.1e} {ed:.1e}", flush=True)
        print(f"grouped {name:22s} bf16 _grouped_mm | fprop {t_bf:.3f} dgrad {t_bf_d:.3f} wgrad {t_bf_w:.3f} ms",
              flush=True)
        rows.append(r)
        del x, w, gy, xq, xs, gq, gs, wq, ws, wtq, gyt, xt
    return rows


def gwgrad_rows():
    """The routed experts' Wgrad: moeco's Hopper kernel (`cuda_gemm.fp8_grouped_wgrad_nt`) against Triton's
    grouped kernel, each GEMM alone on the same quantized operands and with the quantization
    (`fp8_grouped_wgrad`), vs BF16 `torch._grouped_mm` (dy^T . x, offsets along the tokens). Shapes: V3's
    experts (32 x 512 tokens, 2048 x 7168 and 7168 x 2048) and the `small` preset's (64 experts, 16384
    tokens x top-6, 1536 x 1536 and 1536 x 768), with even and with skewed token counts."""
    from moeco.fp8 import cuda_gemm as cg

    rows = []
    gen = torch.Generator().manual_seed(0)
    cases = [("V3 gate/up", 32, 16384, 2048, 7168, False), ("V3 down", 32, 16384, 7168, 2048, False),
             ("small gate/up", 64, 98304, 1536, 1536, False), ("small down", 64, 98304, 1536, 768, False),
             ("small gate/up skewed", 64, 98304, 1536, 1536, True), ("small down skewed", 64, 98304, 1536, 768, True)]
    for name, E, T, N, K, skew in cases:
        if skew:  # token counts from a Zipf-like routing skew; some experts nearly empty
            w = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** 0.8
            counts = torch.distributions.Multinomial(T, probs=w / w.sum()).sample().to(torch.int64)
            counts = counts // 8 * 8  # BF16 _grouped_mm wants 16-byte aligned group boundaries
            T = int(counts.sum())
        else:
            counts = torch.full((E,), T // E, dtype=torch.int64)
        offs = counts.cumsum(0).to(torch.int32).cuda()
        gy = torch.randn(T, N, generator=gen).to(device="cuda", dtype=torch.bfloat16)
        x = torch.randn(T, K, generator=gen).to(device="cuda", dtype=torch.bfloat16)
        xq, xs = quantize_act_1x128(x)
        flop = 2 * T * N * K
        gyt, xt = gy.t().contiguous(), x.t().contiguous()
        t_bf = gpu_ms(lambda: torch._grouped_mm(gyt, xt.t(), offs=offs))
        ops = grouped_wgrad_operands(gy, xq, xs, offs)
        assert cg.grouped_supported(*ops[:4]), name
        ref = tk.grouped_wgrad_gemm(*ops, E, gemm="triton")
        got = tk.grouped_wgrad_gemm(*ops, E, gemm="wgmma")
        err = rel(got, ref)
        t_tri = gpu_ms(lambda: tk.grouped_wgrad_gemm(*ops, E, gemm="triton"))
        t_wg = gpu_ms(lambda: tk.grouped_wgrad_gemm(*ops, E, gemm="wgmma"))
        t_tri_q = gpu_ms(lambda: fp8_grouped_wgrad(gy, xq, xs, offs, E, gemm="triton"))
        t_wg_q = gpu_ms(lambda: fp8_grouped_wgrad(gy, xq, xs, offs, E, gemm="wgmma"))
        r = dict(shape=name, E=E, T=T, N=N, K=K, skew=skew, bf16_ms=t_bf, triton_ms=t_tri, wgmma_ms=t_wg,
                 triton_incl_quant_ms=t_tri_q, wgmma_incl_quant_ms=t_wg_q, rel_err=err)
        rows.append(r)
        tf = lambda t: flop / t / 1e9  # noqa: E731
        print(f"gwgrad {name:22s} E={E:3d} T={T:6d} {N:5d} x {K:5d} | bf16 {t_bf:.3f} ms {tf(t_bf):4.0f} TF | "
              f"triton {t_tri:.3f} {tf(t_tri):4.0f} TF {t_bf / t_tri:.2f}x | wgmma {t_wg:.3f} {tf(t_wg):4.0f} TF "
              f"{t_bf / t_wg:.2f}x ({t_tri / t_wg:.2f}x triton) | incl. quant: triton {t_tri_q:.3f} "
              f"{t_bf / t_tri_q:.2f}x, wgmma {t_wg_q:.3f} {t_bf / t_wg_q:.2f}x | diff {err:.1e}", flush=True)
        del gy, x, xq, xs, gyt, xt, ops, ref, got
    return rows


def _fbgemm_ops():
    """torch.ops.fbgemm after loading FBGEMM's gen-AI kernels (pip fbgemm-gpu-genai), or None."""
    try:
        import fbgemm_gpu.experimental.gen_ai  # noqa: F401  (registers torch.ops.fbgemm.*)
    except Exception as exc:
        print(f"fbgemm: not loadable: {exc!r:.300}", flush=True)
        return None
    return torch.ops.fbgemm


def fbgemm_rows(tokens):
    """FBGEMM's CUTLASS groupwise FP8 GEMMs (1x128 activations x 128x128 weights, the V3 recipe):
    dense `f8f8bf16_groupwise` per shape and `f8f8bf16_groupwise_grouped` (32 experts x 512 tokens),
    against bf16 and cuBLAS / moeco's Triton kernels in the same run. The scale layouts are probed:
    each candidate is checked against moeco's result before it is timed."""
    ops = _fbgemm_ops()
    if ops is None:
        return "fbgemm not loadable"
    rows = []
    for T in tokens:
        for K, N in SHAPES:
            flop = 2 * T * K * N
            x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
            xq, xs = quantize_act_1x128(x)
            wq, ws = quantize_weight_128x128(w)
            ref = fp8_gemm(xq, xs, wq, ws, torch.bfloat16)
            t_bf = gpu_ms(lambda: torch.mm(x, w.t()))
            t_mo = gpu_ms(lambda: fp8_gemm(xq, xs, wq, ws, torch.bfloat16))
            r = dict(T=T, K=K, N=N, bf16_ms=t_bf, moeco_ms=t_mo, moeco_x=t_bf / t_mo)
            xs_km = xs.t()  # (KB, M), M contiguous: the buffer moeco's quantizer writes
            for lay, sw in (("w_kn", ws.t().contiguous()), ("w_nk", ws.contiguous())):
                try:
                    out = ops.f8f8bf16_groupwise(xq, wq, xs_km, sw)
                    err = rel(out, ref)
                    r[f"fbgemm_{lay}_err"] = err
                    if err > 2e-2:
                        continue
                    t = gpu_ms(lambda: ops.f8f8bf16_groupwise(xq, wq, xs_km, sw))
                    r.update({f"fbgemm_{lay}_ms": t, "fbgemm_ms": t, "fbgemm_x": t_bf / t, "fbgemm_layout": lay})
                except Exception as exc:
                    r[f"fbgemm_{lay}"] = f"failed: {exc!r:.200}"
            rows.append(r)
            errs = " ".join(f"{k[7:]}={v if isinstance(v, str) else f'{v:.1e}'}" for k, v in r.items()
                            if k.startswith("fbgemm_w") and not k.endswith("_ms"))
            print(f"fbgemm T={T:6d} K={K:6d} N={N:6d} | bf16 {t_bf:.3f} ms | moeco auto {t_mo:.3f} "
                  f"{t_bf / t_mo:.2f}x | fbgemm {r.get('fbgemm_ms', float('nan')):.3f} ms "
                  f"{flop / r.get('fbgemm_ms', float('nan')) / 1e9:5.0f} TF {r.get('fbgemm_x', float('nan')):.2f}x "
                  f"[{r.get('fbgemm_layout', '-')}] | {errs}", flush=True)
            del x, w, xq, xs, wq, ws, ref
    E, D, Fh, T = 32, 7168, 2048, 16384
    offs = torch.full((E,), T // E, dtype=torch.int32, device="cuda").cumsum(0).to(torch.int32)
    sizes = torch.full((E,), T // E, dtype=torch.int64, device="cuda")
    for name, (N, K) in (("gate/up (E,2048,7168)", (Fh, D)), ("down (E,7168,2048)", (D, Fh))):
        x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        xq, xs = quantize_act_1x128(x)
        wq, ws = tk.quantize_weight_128x128(w.float())
        ref = tk.fp8_grouped_gemm_nt(xq, xs, wq, ws, offs, torch.bfloat16)
        t_bf = gpu_ms(lambda: torch._grouped_mm(x, w.transpose(-2, -1), offs=offs))
        t_tr = gpu_ms(lambda: tk.fp8_grouped_gemm_nt(xq, xs, wq, ws, offs, torch.bfloat16))
        r = dict(shape=name, bf16_ms=t_bf, triton_ms=t_tr, triton_x=t_bf / t_tr)
        kb = xs.shape[1]
        xs_groups = xs.reshape(E, T // E, kb).transpose(1, 2).contiguous()  # per expert (KB, M_e)
        for xl, sx in (("x_global", xs.t()), ("x_groups", xs_groups)):
            for wl, sw in (("w_kn", ws.transpose(1, 2).contiguous()), ("w_nk", ws.contiguous())):
                key = f"{xl}_{wl}"
                try:
                    out = ops.f8f8bf16_groupwise_grouped(xq, wq, sx, sw, sizes)
                    err = rel(out, ref)
                    r[key + "_err"] = err
                    if err > 2e-2:
                        continue
                    t = gpu_ms(lambda: ops.f8f8bf16_groupwise_grouped(xq, wq, sx, sw, sizes))
                    r.update({key + "_ms": t, "fbgemm_ms": t, "fbgemm_x": t_bf / t, "fbgemm_layout": key})
                except Exception as exc:
                    r[key] = f"failed: {exc!r:.200}"
        rows.append(r)
        print(f"fbgemm grouped {name} | bf16 {t_bf:.3f} ms | moeco triton {t_tr:.3f} {t_bf / t_tr:.2f}x | fbgemm "
              f"{r.get('fbgemm_ms', float('nan')):.3f} {r.get('fbgemm_x', float('nan')):.2f}x "
              f"[{r.get('fbgemm_layout', '-')}] | " + " ".join(f"{k}={v if isinstance(v, str) else f'{v:.1e}'}"
                                                         for k, v in r.items() if k.startswith("x_")), flush=True)
        del x, w, xq, xs, wq, ws, ref
    return rows


def wgmma_rows(tokens):
    from moeco.fp8 import cuda_gemm as cg
    from moeco.fp8.quantize import quantize_act_1x128_t

    rows = []
    # (stages, cluster, tile rows, tile columns)
    variants = ((4, 1, 128, 128), (6, 1, 128, 128), (3, 1, 128, 128), (4, 2, 128, 128), (4, 1, 256, 128), (4, 1, 128, 192))
    for kind in ("fprop", "wgrad"):
        for T in tokens:
            for K, N in SHAPES:
                if kind == "fprop":  # y (T, N) = x (T, K) . W (N, K)^T
                    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
                    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
                    ops, out_dtype = (*quantize_act_1x128(x), *quantize_weight_128x128(w)), torch.bfloat16
                    bf16 = lambda: torch.mm(x, w.t())  # noqa: E731
                else:  # dW (N, K) = dy^T (N, T) . x (T, K)
                    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
                    dy = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
                    ops, out_dtype = (*quantize_act_1x128_t(dy), *quantize_act_1x128_t(x)), torch.float32
                    bf16 = lambda: torch.mm(dy.t(), x)  # noqa: E731
                flop = 2 * T * K * N
                t_bf = gpu_ms(bf16)
                t_cu = gpu_ms(lambda: fp8_gemm(*ops, out_dtype, backend="scaled_mm"))
                r = dict(kind=kind, T=T, K=K, N=N, bf16_ms=t_bf, cublas_ms=t_cu)
                line = (f"wgmma {kind} T={T:6d} K={K:6d} N={N:6d} | bf16 {t_bf:7.3f} ms | cuBLAS {t_cu:7.3f} ms "
                        f"{flop / t_cu / 1e9:5.0f} TF {t_bf / t_cu:4.2f}x")
                for st, cl, bm, bn in variants:
                    name = f"s{st}c{cl}" + ("" if bm == 128 else f"m{bm}") + ("" if bn == 128 else f"n{bn}")
                    try:
                        cg.check_variant(bn, out_dtype == torch.float32, st, cl, kind == "wgrad", bm)
                    except ValueError as exc:
                        line += f" | {name} n/a ({exc})"[:60]
                        continue
                    if cg.fp8_gemm_nt(*ops, out_dtype, bn=bn, stages=st, cluster=cl, bm=bm) is None:
                        raise RuntimeError(f"the wgmma kernel is unavailable here: {cg.status()}")
                    t = gpu_ms(lambda: cg.fp8_gemm_nt(*ops, out_dtype, bn=bn, stages=st, cluster=cl, bm=bm))
                    r[f"{name}_ms"] = t
                    line += f" | {name} {t:7.3f} {flop / t / 1e9:5.0f} TF {t_bf / t:4.2f}x"
                rows.append(r)
                print(line, flush=True)
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="probe,n576,gemm,quant,grouped,retile,retile_moe,minb,dual,div,linear,fbgemm,wgmma,gwgrad")
    p.add_argument("--tokens", default="4096,16384")
    p.add_argument("--json")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("tools/fp8_gemm_tune.py needs a CUDA GPU", file=sys.stderr)
        return 1
    import triton

    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__}", flush=True)
    tokens = [int(t) for t in a.tokens.split(",")]
    out = {}
    for sec, fn in (("probe", probe_rows), ("n576", lambda: n576_rows(tokens)), ("gemm", lambda: gemm_rows(tokens)), ("quant", lambda: quant_rows(tokens)),
                    ("grouped", grouped_rows), ("retile", retile_rows), ("retile_moe", retile_moe_rows), ("minb", minb_rows),
                    ("dual", lambda: dual_rows(tokens)), ("div", lambda: div_rows(tokens)),
                    ("linear", lambda: linear_rows(tokens)), ("fbgemm", lambda: fbgemm_rows(tokens)),
                    ("wgmma", lambda: wgmma_rows(tokens)), ("gwgrad", gwgrad_rows)):
        if sec in a.only.split(","):
            try:
                out[sec] = fn()
            except Exception as exc:  # one section failing should not lose the others
                import traceback

                traceback.print_exc()
                out[sec] = f"failed: {exc!r}"
            if a.json:
                with open(a.json, "w") as f:
                    json.dump(out, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
