"""The MoE combine, fused Triton kernels vs the PyTorch gather + multiply + sum, on one GPU.

    PYTHONPATH=src python bench/moe_combine.py [--tokens 16384] [--k 6] [--dim 1536]

GPU time (bench/_timing.py: CUDA-graph replays, L2 flushed) of the forward and of forward + backward
at the `small` preset's shape by default, with the bytes each moves against HBM bandwidth (the fused
forward reads y once and writes the output; its backward reads grad_out and y and writes grad_y).
"""

from __future__ import annotations

import argparse
import sys

import torch

from _timing import gpu_ms
from moeco.model import moe_kernels


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--k", type=int, default=6)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--dim", type=int, default=1536)
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    T, K, D = a.tokens, a.k, a.dim
    idx = torch.rand(T, a.experts, device="cuda").topk(K, dim=1).indices
    order = idx.flatten().argsort(stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device="cuda")
    y = torch.randn(T * K, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.rand(T, K, device="cuda", requires_grad=True)
    g = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
    fwd_bytes = (T * K * D + T * D) * 2
    bwd_bytes = (T * K * D * 3) * 2  # grad_out rows (once per copy), y, grad_y
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | T={T} K={K} D={D} bf16", flush=True)
    res = {}
    for name, fn in (("pytorch", moe_kernels.combine_reference), ("fused", moe_kernels.fused)):
        with torch.no_grad():
            t_f = gpu_ms(lambda: fn(y, w, order, inverse))

        def fb():
            y.grad = w.grad = None
            fn(y, w, order, inverse).backward(g)

        t_fb = gpu_ms(fb)
        res[name] = (t_f, t_fb)
        print(f"{name:8s} forward {t_f:.3f} ms ({fwd_bytes / t_f / 1e6:5.0f} GB/s of the fused bytes) | "
              f"forward + backward {t_fb:.3f} ms", flush=True)
    print(f"fused / pytorch: forward {res['pytorch'][0] / res['fused'][0]:.2f}x, "
          f"forward + backward {res['pytorch'][1] / res['fused'][1]:.2f}x "
          f"(fused fwd+bwd moves {(fwd_bytes + bwd_bytes) / 1e9:.2f} GB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
