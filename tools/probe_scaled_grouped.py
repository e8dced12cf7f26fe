"""Probe: does this torch/GPU take DeepSeek's fine-grained scales in a grouped FP8 GEMM?

    PYTHONPATH=src python tools/probe_scaled_grouped.py

Tries torch.nn.functional.scaled_grouped_mm with BlockWise1x128 activations and BlockWise128x128
weights (and RowWise for comparison) on 2-D x 3-D operands with offsets, checks the result
against moeco's reference, and times the ones that work against the Triton grouped kernel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeco.fp8 import triton_kernels
from moeco.fp8.compute import fp8_grouped_gemm_loop
from moeco.fp8.quantize import quantize_act_1x128, quantize_weight_128x128

E, TE, K, N = 8, 512, 2048, 1024
torch.manual_seed(0)
x = torch.randn(E * TE, K, device="cuda")
w = torch.randn(E, N, K, device="cuda") / K**0.5
offs = torch.arange(1, E + 1, device="cuda", dtype=torch.int32) * TE
xq, xs = quantize_act_1x128(x)
wq, ws = quantize_weight_128x128(w)
ref = fp8_grouped_gemm_loop(xq, xs, wq, ws, [(e * TE, (e + 1) * TE) for e in range(E)], torch.float32, "reference")
tri = triton_kernels.fp8_grouped_gemm_nt(xq, xs, wq, ws, offs, torch.bfloat16)
print("triton grouped max rel err", ((tri.float() - ref).abs().max() / ref.abs().max()).item())
ST = F.ScalingType
cases = {
    "1x128 (T,KB) col-major / 128x128 (E,NB,KB)->T": lambda: (xs.t().contiguous().t(), ST.BlockWise1x128,
                                                            ws.transpose(1, 2), ST.BlockWise128x128),
    "1x128 (T,KB) row-major / 128x128 (E,KB,NB)": lambda: (xs.contiguous(), ST.BlockWise1x128,
                                                          ws.transpose(1, 2).contiguous(), ST.BlockWise128x128),
    "1x128 / 1x128 expanded weights": lambda: (xs.t().contiguous().t(), ST.BlockWise1x128,
                                               ws.repeat_interleave(128, 1).transpose(1, 2).contiguous(),
                                               ST.BlockWise1x128),
}
for name, make in cases.items():
    try:
        sa, ra, sb, rb = make()
        out = F.scaled_grouped_mm(xq, wq.transpose(1, 2), sa, ra, sb, rb, offs=offs, output_dtype=torch.bfloat16)
        err = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        from triton.testing import do_bench

        t = do_bench(lambda: F.scaled_grouped_mm(xq, wq.transpose(1, 2), sa, ra, sb, rb, offs=offs,
                                                 output_dtype=torch.bfloat16))
        t_tri = do_bench(lambda: triton_kernels.fp8_grouped_gemm_nt(xq, xs, wq, ws, offs, torch.bfloat16))
        print(f"{name}: OK max rel err {err:.2e}; {t:.3f} ms vs triton {t_tri:.3f} ms")
    except Exception as exc:  # noqa: BLE001
        print(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
# row-wise (per token, per output channel over all of K): a different recipe, for its speed only
try:
    xr = x.abs().amax(1, keepdim=True) / 448
    xrq = (x / xr).to(torch.float8_e4m3fn)
    wr = w.abs().amax(2) / 448
    wrq = (w / wr[..., None]).to(torch.float8_e4m3fn)
    from triton.testing import do_bench

    f = lambda: F.scaled_grouped_mm(xrq, wrq.transpose(1, 2), xr.squeeze(1), ST.RowWise, wr, ST.RowWise, offs=offs,
                                    output_dtype=torch.bfloat16)
    f()
    xb, wb = x.bfloat16(), w.bfloat16()
    t_bf = do_bench(lambda: torch._grouped_mm(xb, wb.transpose(1, 2), offs=offs))
    print(f"row-wise scaled_grouped_mm {do_bench(f):.3f} ms; bf16 _grouped_mm {t_bf:.3f} ms")
except Exception as exc:  # noqa: BLE001
    print(f"row-wise: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
