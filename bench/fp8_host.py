"""Host (CPU) cost of the FP8 layers' eager calls: what a caller without CUDA graphs pays per call.

    PYTHONPATH=src python bench/fp8_host.py [--tokens 128] [--iters 300] [--profile] [--json out.json]

With few tokens the GPU work is short, so a loop of calls runs at the rate the host issues them:
host ms per call = wall time of `iters` calls (one sync at the end) / iters. Rows: nn.Linear bf16
forward + backward (the baseline), Fp8Linear forward + backward, and each piece alone (the Triton
quantization launches, the cuBLAS block-scaled GEMM through moeco's wrapper and bare). `--profile`
prints cProfile's top functions of the Fp8Linear loop (tottime), which says where the time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time

import torch

from moeco.fp8 import Fp8Linear
from moeco.fp8 import triton_kernels as tk
from moeco.fp8.gemm import fp8_gemm
from moeco.fp8.quantize import quantize_act_1x128, quantize_act_1x128_t, quantize_weight_128x128


def host_ms_per_call(fn, iters: int) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / iters * 1e3)
    return best


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--K", type=int, default=7168)
    p.add_argument("--N", type=int, default=2048)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json")
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    T, K, N = a.tokens, a.K, a.N
    x = torch.randn(T, K, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    lin_bf = torch.nn.Linear(K, N, bias=False, device="cuda", dtype=torch.bfloat16)
    lin8 = Fp8Linear(K, N, device="cuda")  # FP32 master weight, as training keeps it

    def fwd_bwd(m):
        def run():
            m(x).sum().backward()
        return run

    xd = x.detach()
    xq, xs = quantize_act_1x128(xd)
    wq, ws = quantize_weight_128x128(lin8.weight.detach())
    cases = {
        "nn.Linear bf16 fwd+bwd": fwd_bwd(lin_bf),
        "Fp8Linear fwd+bwd": fwd_bwd(lin8),
        "quantize_act_1x128": lambda: quantize_act_1x128(xd),
        "quantize_act_1x128_t (from FP8)": lambda: quantize_act_1x128_t(xq, xs),
        "quantize_weight_128x128 (+W^T)": lambda: quantize_weight_128x128(lin8.weight.detach(), transposed=True),
        "fp8_gemm (cuBLAS wrapper)": lambda: fp8_gemm(xq, xs, wq, ws, torch.bfloat16),
        "torch._scaled_mm bare": lambda: torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(),
                                                          out_dtype=torch.bfloat16),
        "torch.mm bf16 bare": lambda: torch.mm(xd, lin_bf.weight.t()),
        "torch.empty x2 (allocator)": lambda: (torch.empty(T, K, device="cuda"), torch.empty(K, device="cuda")),
        "triton launch, one-row 1x128 call": lambda: tk.quantize_act_1x128(xd[:1]),
    }
    rows = []
    for name, fn in cases.items():
        try:
            ms = host_ms_per_call(fn, a.iters)
        except Exception as exc:  # a probe that fails on this build is reported, not fatal
            print(f"{name:36s} failed: {exc!r:.200}", flush=True)
            continue
        rows.append({"case": name, "host_ms": ms, "T": T, "K": K, "N": N})
        print(f"{name:36s} {ms * 1e3:8.1f} us per call", flush=True)
    # Does any call wait for the GPU? (Host and GPU time then add up instead of overlapping.)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fwd_bwd(lin8)()
    torch.cuda.set_sync_debug_mode("default")
    print(f"synchronizing calls in one Fp8Linear fwd+bwd: {len(caught)}", flush=True)
    for w in caught[:5]:
        print(f"  {w.filename}:{w.lineno}: {str(w.message)[:200]}", flush=True)
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        run = fwd_bwd(lin8)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as tp:
            for _ in range(5):
                run()
            torch.cuda.synchronize()
        print(tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
        print(tp.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
        run = fwd_bwd(lin8)
        for _ in range(10):
            run()
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(a.iters):
            run()
        torch.cuda.synchronize()
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
        print(out.getvalue()[-9000:])
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(40)
        print(out.getvalue()[-9000:])
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
