"""MLA's training attention core on one GPU: which SDPA backend, with and without padding v.

    PYTHONPATH=src python bench/attention_gpu.py [--batch 8 --seq 2048 --heads 16 --qk 96 --v 64]

MLA's heads have a query/key width (qk_nope + qk_rope, 96 for `small`, 192 for V3) wider than the
value (64 / 128). PyTorch's flash kernel needs one head width for q, k and v, so SDPA falls back
to another kernel unless v is zero-padded to the q/k width (the output's extra columns are zero
and are sliced off; gradients are exact). This times causal forward + backward of every backend
that accepts each layout, against the plain math backend, and reports TFLOP/s with the causal
convention (half the square).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def bench(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--qk", type=int, default=96)
    p.add_argument("--v", type=int, default=64)
    p.add_argument("--out", default="")
    a = p.parse_args()
    dev, dt = "cuda", torch.bfloat16
    B, H, S = a.batch, a.heads, a.seq
    q = torch.randn(B, H, S, a.qk, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(B, H, S, a.qk, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(B, H, S, a.v, device=dev, dtype=dt, requires_grad=True)
    g = torch.randn(B, H, S, a.v, device=dev, dtype=dt)
    # causal fwd: QK^T and PV over half the square; bwd = 2.5x fwd (dQ, dK, dV, dP, recomputed S)
    fwd_flops = 2 * B * H * S * S * (a.qk + a.v) / 2
    total_flops = fwd_flops * 3.5
    ref = None
    rows = []
    for pad in (False, True):
        for name, backend in [("math", SDPBackend.MATH), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                              ("default", None)]:
            if name == "math" and pad:
                continue

            def step():
                vv = F.pad(v, (0, a.qk - a.v)) if pad else v
                ctx = sdpa_kernel(backend) if backend is not None else contextlib.nullcontext()
                with ctx:
                    o = F.scaled_dot_product_attention(q, k, vv, is_causal=True, scale=a.qk ** -0.5)
                o = o[..., :a.v]
                o.backward(g)
                return o
            try:
                q.grad = k.grad = v.grad = None
                o = step()
                grads = [q.grad.float(), k.grad.float(), v.grad.float()]
                if ref is None:
                    ref = (o.float(), grads)
                err = max((o.float() - ref[0]).abs().max().item(),
                          *[(x - y).abs().max().item() for x, y in zip(grads, ref[1])])
                ms = bench(step)
                row = dict(backend=name, pad_v=pad, ms=ms, tflops=total_flops / ms / 1e9, max_err_vs_math=err)
            except Exception as exc:  # a backend that refuses the layout
                row = dict(backend=name, pad_v=pad, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
            rows.append(row)
            print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, args=vars(a), rows=rows), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
