"""Tile sweep of the FP8 activation-quantization kernels at the shapes a `small` / V3 step runs.

    PYTHONPATH=src python tools/fp8_quant_tune.py

For each shape: the 1x128 (row) kernel over block_m x num_warps, and the 128x1 (token-wise, Wgrad)
kernel from BF16 and from FP8 over block_c x num_warps; GB/s against a device copy measured here.
"""

from __future__ import annotations

import torch
from triton.testing import do_bench

from moeco.fp8 import triton_kernels as tk

copy_x = torch.empty(2**30, dtype=torch.uint8, device="cuda")
copy_y = torch.empty_like(copy_x)
copy_gbs = 2 * copy_x.numel() / do_bench(lambda: copy_y.copy_(copy_x), return_mode="median") / 1e6
print(f"device copy {copy_gbs:.0f} GB/s")
del copy_x, copy_y
for T, C in ((16384, 1536), (16384, 3072), (98304, 1536), (16384, 7168)):
    x = torch.randn(T, C, device="cuda", dtype=torch.bfloat16)
    xq, xs = tk.quantize_act_1x128(x)
    kb = -(-C // 128)
    res = []
    for bm in (8, 16, 32, 64):
        for nw in (2, 4, 8):
            ms = do_bench(lambda: tk.quantize_act_1x128(x, block_m=bm, num_warps=nw), return_mode="median")
            res.append((T * C * 3 + T * kb * 4) / ms / 1e6)
            res[-1] = (res[-1], f"block_m={bm} warps={nw}", ms)
    best = max(res)
    base = next(r for r in res if r[1] == "block_m=32 warps=4")
    print(f"row   T={T:6d} C={C:5d} | best {best[1]:22s} {best[2]:.3f} ms {best[0]:5.0f} GB/s {best[0] / copy_gbs:4.0%} "
          f"| default {base[2]:.3f} ms {base[0]:5.0f} GB/s {base[0] / copy_gbs:4.0%}", flush=True)
    for src, args, nbytes in (("bf16", (x,), T * C * 3), ("fp8", (xq, xs), T * C * 2 + T * kb * 4)):
        res = []
        for bc in (32, 64, 128):
            for nw in (4, 8):
                ms = do_bench(lambda: tk.quantize_act_1x128_t(*args, block_c=bc, num_warps=nw), return_mode="median")
                res.append(((nbytes + C * (T // 128) * 4) / ms / 1e6, f"block_c={bc} warps={nw}", ms))
        best = max(res)
        base = next(r for r in res if r[1] == "block_c=32 warps=4")
        print(f"tok   T={T:6d} C={C:5d} {src:4s} | best {best[1]:22s} {best[2]:.3f} ms {best[0]:5.0f} GB/s "
              f"{best[0] / copy_gbs:4.0%} | default {base[2]:.3f} ms {base[0]:5.0f} GB/s {base[0] / copy_gbs:4.0%}",
              flush=True)
