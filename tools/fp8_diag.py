"""Diagnostics on CUDA: GPU vs CPU-reference error of each FP8 GEMM backend and of Fp8Linear's three GEMMs."""
import torch

from moeco.fp8 import Fp8Linear, Fp8Recipe
from moeco.fp8.gemm import emulate_hopper_accumulation, fp8_gemm, fp8_gemm_reference
from moeco.fp8.quantize import quantize_act_1x128, quantize_weight_128x128


def rel(a, b):
    return ((a.double().cpu() - b.double().cpu()).abs().max() / b.double().abs().max()).item()


for M, N, K in [(256, 512, 1024), (300, 768, 1024), (64, 128, 4096)]:
    a, b = torch.randn(M, K), torch.randn(N, K)
    aq, sa = quantize_act_1x128(a)
    bq, sb = quantize_weight_128x128(b)
    ref = fp8_gemm_reference(aq, sa, bq, sb)
    emu = emulate_hopper_accumulation(aq[:64], sa[:64], bq[:64], sb[:1], promotion=128)
    row = [f"emulated {rel(emu, ref[:64, :64]):.2e}"]
    for be in ("scaled_mm", "triton"):
        out = fp8_gemm(aq.cuda(), sa.cuda(), bq.cuda(), sb.cuda(), torch.float32, backend=be)
        row.append(f"{be} {rel(out, ref):.2e}")
    print(f"gemm M={M} N={N} K={K}: " + " | ".join(row))
for be in ("scaled_mm", "triton"):
    torch.manual_seed(0)
    lin = Fp8Linear(1024, 768, recipe=Fp8Recipe(backend="reference"))
    x = torch.randn(300, 1024, requires_grad=True)
    y = lin(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    lc = Fp8Linear(1024, 768, recipe=Fp8Recipe(backend=be)).cuda()
    lc.load_state_dict(lin.state_dict())
    xc = x.detach().cuda().requires_grad_()
    yc = lc(xc)
    yc.backward(gy.cuda())
    print(f"Fp8Linear {be}: y {rel(yc, y):.2e} dx {rel(xc.grad, x.grad):.2e} dW {rel(lc.weight.grad, lin.weight.grad):.2e}")
