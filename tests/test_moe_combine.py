"""The fused MoE combine (moeco.model.moe_kernels) against the PyTorch combine: CPU under
TRITON_INTERPRET=1, or CUDA."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import
pytest.importorskip("triton")

from moeco import triton_support  # noqa: E402
from moeco.model import moe_kernels  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not triton_support.interpreting():
    pytest.skip("Triton on CPU needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)


def _routing(T, K, E, gen):
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    order = idx.flatten().argsort(stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return order.to(DEVICE), inverse.to(DEVICE)


@pytest.mark.parametrize("T,K,E,D,dtype", [(7, 3, 5, 200, torch.float32), (16, 2, 4, 64, torch.bfloat16),
                                           (5, 1, 3, 130, torch.float32)])
def test_fused_combine_matches_pytorch(T, K, E, D, dtype):
    gen = torch.Generator().manual_seed(T * K + D)
    order, inverse = _routing(T, K, E, gen)
    y0 = torch.randn(T * K, D, generator=gen).to(DEVICE, dtype)
    w0 = torch.rand(T, K, generator=gen).to(DEVICE)  # float32 gate values, as the router gives them
    g = torch.randn(T, D, generator=gen).to(DEVICE, dtype)
    res = []
    for fn in (moe_kernels.fused, moe_kernels.combine_reference):
        y, w = y0.clone().requires_grad_(), w0.clone().requires_grad_()
        out = fn(y, w, order, inverse)
        out.backward(g)
        res.append((out.detach().float(), y.grad.float(), w.grad.float()))
    # float32: the same products, summed in another order; bf16: the reference rounds each product
    # to bf16 and its weight gradient is a bf16 sum, the kernels keep FP32 until the store
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, ref in zip(*res):
        assert ((got - ref).abs().max() / ref.abs().max()).item() < tol
    assert res[0][0].dtype == torch.float32 and res[0][2].shape == (T, K)
