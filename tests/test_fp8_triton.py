"""Triton kernels against their PyTorch references: CPU under TRITON_INTERPRET=1, or CUDA.

Skipped where Triton is not installed. The interpreter is slow (~ms per tl.dot), so shapes are tiny.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import
pytest.importorskip("triton")

from moeco.fp8 import triton_kernels  # noqa: E402
from moeco.fp8.gemm import fp8_gemm_reference  # noqa: E402
from moeco.fp8.quantize import (  # noqa: E402
    quantize_act_1x128,
    quantize_act_1x128_reference,
    quantize_weight_128x128,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not triton_kernels.interpreting():
    pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)


def _bits(q):
    return q.view(torch.uint8)


@pytest.mark.parametrize("shape", [(8, 256), (5, 200), (2, 3, 130)])
@pytest.mark.parametrize("pow2", [False, True])
def test_triton_act_quant_is_bit_exact(shape, pow2):
    gen = torch.Generator().manual_seed(sum(shape) + pow2)
    x = torch.randn(shape, generator=gen) * torch.logspace(-3, 3, shape[-1])
    x[..., :3] = 0  # exact zeros, and an all-zero row
    x.view(-1, shape[-1])[0] = 0
    x = x.to(DEVICE)
    q, s = triton_kernels.quantize_act_1x128(x, pow2_scale=pow2)
    q_ref, s_ref = quantize_act_1x128_reference(x, pow2_scale=pow2)
    assert torch.equal(s.contiguous(), s_ref)
    assert torch.equal(_bits(q), _bits(q_ref))


@pytest.mark.parametrize("from_fp8", [False, True])
def test_triton_quant_along_tokens_is_bit_exact(from_fp8):
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(200, 48, generator=gen) * 3).to(DEVICE)
    if from_fp8:
        xq, xs = quantize_act_1x128_reference(x)
        q, s = triton_kernels.quantize_act_1x128_t(xq, xs)
        xd = (xq.float() * xs.repeat_interleave(128, -1)[:, :48])
        q_ref, s_ref = quantize_act_1x128_reference(xd.t().contiguous())
    else:
        q, s = triton_kernels.quantize_act_1x128_t(x)
        q_ref, s_ref = quantize_act_1x128_reference(x.t().contiguous())
    assert q.shape == (48, 200) and s.shape == (48, 2)
    assert torch.equal(s, s_ref)
    assert torch.equal(_bits(q), _bits(q_ref))


@pytest.mark.parametrize("M,N,K,b_tiles", [(16, 32, 256, False), (20, 40, 200, False), (16, 24, 256, True)])
def test_triton_gemm_matches_reference(M, N, K, b_tiles):
    gen = torch.Generator().manual_seed(M + N + K)
    a, b = torch.randn(M, K, generator=gen).to(DEVICE), torch.randn(N, K, generator=gen).to(DEVICE)
    aq, sa = quantize_act_1x128(a)
    bq, sb = quantize_act_1x128(b) if b_tiles else quantize_weight_128x128(b)
    out = triton_kernels.fp8_gemm_nt(aq, sa, bq, sb, torch.float32)
    ref = fp8_gemm_reference(aq.cpu(), sa.cpu(), bq.cpu(), sb.cpu(), torch.float32)
    # Interpreter: the same FP8 products and promotion, only the float32 summation order differs.
    # CUDA: Hopper's limited-precision accumulator inside each 128-deep tl.dot (~2e-4, see
    # test_fp8_gpu.py).
    tol = 1e-5 if DEVICE == "cpu" else 5e-4
    assert ((out.cpu() - ref).abs().max() / ref.abs().max()) < tol
    out_bf16 = triton_kernels.fp8_gemm_nt(aq, sa, bq, sb, torch.bfloat16)
    assert out_bf16.dtype == torch.bfloat16
