"""FP8 vs BF16 on one GPU: GEMMs at DeepSeek-V3 shapes, the quantization kernels, Fp8Linear, grouped.

    PYTHONPATH=src python bench/fp8_gemm.py [--quick] [--json out.json] [--only copy,gemm,quant,linear,grouped]

`gemm`: BF16 torch.mm against each FP8 backend on the same operands: cuBLAS (`scaled_mm`), moeco's
Triton kernel, moeco's wgmma kernel (moeco.fp8.cuda_gemm) and `auto` (what Fp8Linear uses).
`grouped`: 32 experts x 512 tokens; bf16 torch._grouped_mm vs the grouped FP8 Triton kernel alone
(several tile configs), fp8_grouped_mm forward (grouped kernels vs the recipe's grouped_kernel="loop"), and
forward + backward.

Every row prints the BF16 baseline measured in the same run and the distance to the hardware
(TFLOP/s for GEMMs, GB/s against a device-to-device copy measured here for the quantization).
Timing, random inputs: GEMM-alone and quantization rows are GPU time (bench/_timing.py: CUDA-graph
replays, L2 flushed before every call, no host cost); Fp8Linear and grouped rows are triton's
do_bench on the eager call (median of ~100 ms of repeats), plus CUDA-graph replay columns for
Fp8Linear: with the weight re-quantized every call (one step, no accumulation) and inside
the recipe's `weight_cache()` (W quantized once per optimizer step: a micro-step with accumulation).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from _timing import capture, gpu_ms
from moeco.fp8 import Fp8Linear, Fp8Recipe, fp8_grouped_mm
from moeco.fp8.gemm import fp8_gemm, scaled_mm_fits
from moeco.fp8.quantize import quantize_act_1x128, quantize_act_1x128_reference, quantize_weight_128x128
from moeco.fp8 import cuda_gemm, cuda_kernels, triton_kernels

# (K, N) of DeepSeek-V3 GEMMs named in issue 5 (hidden 7168, MLA ranks 1536/512+64, experts 2048)
SHAPES = [(7168, 2048), (2048, 7168), (7168, 1536), (1536, 24576), (7168, 576), (16384, 7168)]


def bench_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    x = torch.empty(2 * 1024**3 // 2, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = bench_ms(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / ms / 1e6  # GB/s, read + write


def gemm_rows(tokens_list):
    rows = []
    for T in tokens_list:
        for K, N in SHAPES:
            x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16)
            flop = 2 * T * K * N
            t_bf16 = gpu_ms(lambda: torch.mm(x, w.t()))
            xq, xs = quantize_act_1x128(x)
            wq, ws = quantize_weight_128x128(w)
            r = dict(T=T, K=K, N=N, bf16_ms=t_bf16, bf16_tflops=flop / t_bf16 / 1e9)
            t = gpu_ms(lambda: fp8_gemm(xq, xs, wq, ws, torch.bfloat16, backend="scaled_mm"))
            r.update(scaled_mm_ms=t, scaled_mm_tflops=flop / t / 1e9, scaled_mm_x=t_bf16 / t,
                     scaled_mm_padded=not scaled_mm_fits(T, N, K))
            t = gpu_ms(lambda: fp8_gemm(xq, xs, wq, ws, torch.bfloat16, backend="triton"))
            r.update(triton_ms=t, triton_tflops=flop / t / 1e9, triton_x=t_bf16 / t)
            if cuda_gemm.supported(xq, xs, wq, ws):  # Hopper only
                t = gpu_ms(lambda: fp8_gemm(xq, xs, wq, ws, torch.bfloat16, backend="wgmma"))
                r.update(wgmma_ms=t, wgmma_tflops=flop / t / 1e9, wgmma_x=t_bf16 / t)
            else:
                r.update(wgmma_ms=float("nan"), wgmma_tflops=float("nan"), wgmma_x=float("nan"))
            t = gpu_ms(lambda: fp8_gemm(xq, xs, wq, ws, torch.bfloat16))
            r.update(auto_ms=t, auto_tflops=flop / t / 1e9, auto_x=t_bf16 / t)
            rows.append(r)
            print(f"gemm T={T:6d} K={K:6d} N={N:6d} | bf16 {t_bf16:7.3f} ms {r['bf16_tflops']:6.0f} TF | "
                  + f"scaled_mm{'(pad)' if r['scaled_mm_padded'] else '     '} {r['scaled_mm_ms']:7.3f} ms "
                  f"{r['scaled_mm_tflops']:6.0f} TF {r['scaled_mm_x']:4.2f}x | "
                  + f"triton {r['triton_ms']:7.3f} ms {r['triton_tflops']:6.0f} TF {r['triton_x']:4.2f}x | "
                  + f"wgmma {r['wgmma_ms']:7.3f} ms {r['wgmma_tflops']:6.0f} TF {r['wgmma_x']:4.2f}x | "
                  f"auto {r['auto_ms']:7.3f} ms {r['auto_x']:4.2f}x", flush=True)
            del x, w, xq, xs, wq, ws
    return rows


def quant_rows(copy_gbs, tokens_list):
    rows = []
    for T in tokens_list:
        K = 7168
        x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
        nbytes = T * K * (2 + 1) + T * (K // 128) * 4
        for name, fn in (("triton 1x128", lambda: triton_kernels.quantize_act_1x128(x)),
                         ("torch 1x128 (reference)", lambda: quantize_act_1x128_reference(x))):
            ms = gpu_ms(fn)
            gbs = nbytes / ms / 1e6
            rows.append(dict(T=T, K=K, kernel=name, ms=ms, gbs=gbs, of_copy=gbs / copy_gbs))
            print(f"quant {name:28s} T={T:6d} K={K} | {ms:7.3f} ms {gbs:7.0f} GB/s = {gbs / 4800:5.1%} of 4.8 TB/s, "
                  f"{gbs / copy_gbs:5.1%} of copy", flush=True)
        xq, xs = triton_kernels.quantize_act_1x128(x)
        nbytes_t = T * K * (1 + 1) + 2 * T * (K // 128) * 4
        for name, fn in (("triton fp8 re-tile (Wgrad)", lambda: triton_kernels.quantize_act_1x128_t(xq, xs)),
                         ("NVRTC fp8 re-tile (Wgrad)", lambda: cuda_kernels.token_wise(xq, xs)),
                         ("triton 128x1 from bf16", lambda: triton_kernels.quantize_act_1x128_t(x)),
                         ("NVRTC 128x1 from bf16", lambda: cuda_kernels.token_wise(x))):
            nb = nbytes_t if "fp8" in name else nbytes
            ms = gpu_ms(fn)
            gbs = nb / ms / 1e6
            rows.append(dict(T=T, K=K, kernel=name, ms=ms, gbs=gbs, of_copy=gbs / copy_gbs))
            print(f"quant {name:28s} T={T:6d} K={K} | {ms:7.3f} ms {gbs:7.0f} GB/s = {gbs / 4800:5.1%} of 4.8 TB/s, "
                  f"{gbs / copy_gbs:5.1%} of copy", flush=True)
    return rows


def linear_rows(tokens_list):
    rows = []
    for T in tokens_list:
        for K, N in SHAPES:
            x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16)
            gy = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
            ref = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
            fp8 = Fp8Linear(K, N, device="cuda")  # FP32 master weight, FP8 GEMMs
            xr = x.clone().requires_grad_()
            xf = x.clone().requires_grad_()

            def step_ref():
                ref.weight.grad = None
                xr.grad = None
                ref(xr).backward(gy)

            def step_fp8(cached=True):
                fp8.weight.grad = None
                xf.grad = None
                if not cached:
                    fp8._wcache = None
                fp8(xf).backward(gy)

            flop = 3 * 2 * T * K * N
            t_ref = bench_ms(step_ref)
            t_c = bench_ms(step_fp8)
            t_u = bench_ms(lambda: step_fp8(False))
            t_rg = bench_ms(capture(step_ref).replay)  # both sides as one CUDA graph each: GPU time only
            t_fg = bench_ms(capture(step_fp8).replay)
            with fp8.recipe.weight_cache():  # W quantized once (the first warm-up call), as in a micro-step with accumulation
                t_fwc = bench_ms(capture(step_fp8).replay)
            r = dict(T=T, K=K, N=N, bf16_ms=t_ref, bf16_tflops=flop / t_ref / 1e9, fp8_ms=t_c,
                     fp8_tflops=flop / t_c / 1e9, fp8_x=t_ref / t_c, fp8_requant_ms=t_u, fp8_requant_x=t_ref / t_u,
                     bf16_graph_ms=t_rg, fp8_graph_ms=t_fg, fp8_graph_x=t_rg / t_fg,
                     fp8_graph_tflops=flop / t_fg / 1e9, fp8_graph_wcached_ms=t_fwc, fp8_graph_wcached_x=t_rg / t_fwc)
            rows.append(r)
            print(f"linear fwd+bwd T={T:6d} K={K:6d} N={N:6d} | nn.Linear bf16 {t_ref:7.3f} ms {r['bf16_tflops']:5.0f} TF"
                  f" | Fp8Linear {t_c:7.3f} ms {r['fp8_tflops']:5.0f} TF {r['fp8_x']:4.2f}x"
                  f" | +weight quant {t_u:7.3f} ms {r['fp8_requant_x']:4.2f}x"
                  f" | CUDA graphs: bf16 {t_rg:7.3f} fp8 {t_fg:7.3f} ms {r['fp8_graph_tflops']:5.0f} TF"
                  f" {r['fp8_graph_x']:4.2f}x | W cached {t_fwc:7.3f} {t_rg / t_fwc:4.2f}x", flush=True)
            del x, gy, ref, fp8, xr, xf
    return rows


GROUPED_CONFIGS = [  # (block_m, block_n, num_warps, num_stages) tried for the grouped kernel
    (128, 128, 8, 4), (128, 128, 8, 3), (64, 128, 4, 4), (128, 128, 4, 4),
]


def grouped_rows():
    rows = []
    E, D, Fh, T = 32, 7168, 2048, 16384  # 32 local experts, 512 tokens each
    offs = torch.full((E,), T // E, dtype=torch.int32, device="cuda").cumsum(0).to(torch.int32)
    x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    for name, (N, K) in (("gate/up (E,2048,7168)", (Fh, D)), ("down (E,7168,2048)", (D, Fh))):
        xin = x if K == D else torch.randn(T, Fh, device="cuda", dtype=torch.bfloat16)
        w_bf = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        w32 = w_bf.float()
        flop = 2 * T * K * N
        tf = lambda ms: flop / ms / 1e9  # noqa: E731
        t_bf = bench_ms(lambda: torch._grouped_mm(xin, w_bf.transpose(-2, -1), offs=offs))
        r = dict(shape=name, T=T, E=E, N=N, K=K, bf16_ms=t_bf, bf16_tflops=tf(t_bf))
        print(f"grouped fwd {name:22s} T={T} E={E} | bf16 _grouped_mm {t_bf:7.3f} ms {tf(t_bf):5.0f} TF", flush=True)
        # The grouped FP8 kernel alone (operands quantized beforehand), one launch for all experts.
        xq, xs = quantize_act_1x128(xin)
        wq, ws = quantize_weight_128x128(w_bf)
        ref = torch._grouped_mm(xin, w_bf.transpose(-2, -1), offs=offs).float()
        best = None
        for bm, bn, nw, ns in GROUPED_CONFIGS:
            kw = dict(block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
            try:
                out = triton_kernels.fp8_grouped_gemm_nt(xq, xs, wq, ws, offs, torch.bfloat16, **kw)
                err = ((out.float() - ref).norm() / ref.norm()).item()
                t = bench_ms(lambda: triton_kernels.fp8_grouped_gemm_nt(xq, xs, wq, ws, offs, torch.bfloat16, **kw))
            except Exception as exc:  # a config that does not compile or fit: report and go on
                print(f"  grouped fp8 kernel BM={bm} BN={bn} warps={nw} stages={ns}: failed: {exc!r:.200}", flush=True)
                continue
            key = f"kernel_bm{bm}_bn{bn}_w{nw}_s{ns}"
            r[key + "_ms"], r[key + "_tflops"], r[key + "_relerr_vs_bf16"] = t, tf(t), err
            print(f"  grouped fp8 kernel BM={bm:3d} BN={bn} warps={nw} stages={ns} | {t:7.3f} ms {tf(t):5.0f} TF "
                  f"{t_bf / t:4.2f}x bf16 | rel. L2 diff vs bf16 {err:.2e}", flush=True)
            if best is None or t < best[0]:
                best = (t, key)
        if best:
            r.update(kernel_best_ms=best[0], kernel_best_tflops=tf(best[0]), kernel_best_x=t_bf / best[0],
                     kernel_best=best[1])
        # The expert-weight quantizer alone (FP32 master weights, as training holds them), with and
        # without the transposed copy Dgrad needs; bytes = 4 read + 1 (+1) written per element.
        for transposed in (False, True):
            t = bench_ms(lambda: triton_kernels.quantize_weight_128x128(w32, transposed=transposed))
            gbs = w32.numel() * (6 if transposed else 5) / t / 1e6
            r[f"weight_quant{'_t' if transposed else ''}_ms"] = t
            print(f"  weight quant (E,N,K) fp32 -> E4M3{' + W^T' if transposed else ''} | {t:7.3f} ms {gbs:6.0f} GB/s",
                  flush=True)
        # Whole fp8_grouped_mm forward (activation + weight quantization included), grouped vs loop.
        for mode in ("auto", "loop"):
            t = bench_ms(lambda: fp8_grouped_mm(xin, w32, offs, recipe=Fp8Recipe(grouped_kernel=mode)))
            r[f"fp8_fwd_{mode}_ms"], r[f"fp8_fwd_{mode}_tflops"] = t, tf(t)
            print(f"  fp8_grouped_mm fwd incl. quant, {'grouped kernel' if mode == 'auto' else 'per-expert loop'} "
                  f"| {t:7.3f} ms {tf(t):5.0f} TF {t_bf / t:4.2f}x bf16", flush=True)
        # Forward + backward (3 GEMMs): bf16 _grouped_mm autograd vs fp8_grouped_mm (FP32 master weights).
        gy = torch.randn(T, N, device="cuda", dtype=torch.bfloat16)
        xb = xin.clone().requires_grad_()
        wb = w_bf.clone().requires_grad_()
        w8 = w32.clone().requires_grad_()

        def step_bf():
            xb.grad = wb.grad = None
            torch._grouped_mm(xb, wb.transpose(-2, -1), offs=offs).backward(gy)

        def step_f8():
            xb.grad = w8.grad = None
            fp8_grouped_mm(xb, w8, offs).backward(gy)

        t_bfb = bench_ms(step_bf)
        t_f8b = bench_ms(step_f8)
        r.update(bf16_fwdbwd_ms=t_bfb, bf16_fwdbwd_tflops=3 * tf(t_bfb), fp8_fwdbwd_ms=t_f8b,
                 fp8_fwdbwd_tflops=3 * tf(t_f8b), fp8_fwdbwd_x=t_bfb / t_f8b)
        print(f"  fwd+bwd | bf16 _grouped_mm {t_bfb:7.3f} ms {3 * tf(t_bfb):5.0f} TF | fp8_grouped_mm (grouped "
              f"kernels, incl. quant) {t_f8b:7.3f} ms {3 * tf(t_f8b):5.0f} TF {t_bfb / t_f8b:4.2f}x", flush=True)
        rows.append(r)
        del xq, xs, wq, ws, ref, w_bf, w32, xb, wb, w8, gy
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tokens 4096 only")
    p.add_argument("--json", help="write all rows here")
    p.add_argument("--only", default="copy,gemm,quant,linear,grouped")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("bench/fp8_gemm.py needs a CUDA GPU", file=sys.stderr)
        return 1
    import triton

    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | triton {triton.__version__} | "
          f"{cuda_gemm.status()}", flush=True)
    tokens = [4096] if a.quick else [4096, 16384]
    out = {}
    only = a.only.split(",")
    copy_gbs = copy_bandwidth()
    out["copy_gbs"] = copy_gbs
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)", flush=True)
    if "gemm" in only:
        out["gemm"] = gemm_rows(tokens)
    if "quant" in only:
        out["quant"] = quant_rows(copy_gbs, tokens)
    if "linear" in only:
        out["linear"] = linear_rows(tokens)
    if "grouped" in only:
        out["grouped"] = grouped_rows()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
