"""One training step of a preset (default `small`) with the FP8 recipe vs BF16, on one GPU.

    PYTHONPATH=src python bench/fp8_train_step.py [--preset small] [--batch 4] [--seq 2048]

Both runs: FP32 master weights, bf16 autocast (as `moeco train` does), AdamW, the same seed and
batch; the FP8 run builds its Linears and routed experts through Fp8Recipe. Prints the median
step time over the timed steps and tokens/s; the loss of the first step shows both compute the
same model.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from moeco import ModelConfig
from moeco.fp8.recipe import recipe_by_name
from moeco.model.transformer import Transformer


def run(preset: str, precision: str, batch: int, seq: int, steps: int, dev: str = "cuda") -> dict:
    cfg = ModelConfig.preset(preset)
    torch.manual_seed(0)
    recipe = recipe_by_name(precision)
    model = Transformer(cfg, recipe=recipe).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev == "cuda")
    ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1)).to(dev)
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    times, losses = [], []
    for i in range(steps):
        sync()
        t0 = time.perf_counter()
        with torch.autocast(dev, dtype=torch.bfloat16):
            out = model(ids[:, :-1])
        logits = out if isinstance(out, torch.Tensor) else out.logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    timed = sorted(times[2:])
    ms = 1000 * timed[len(timed) // 2]
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else float("nan")
    del model, opt
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return dict(precision=precision, ms=ms, tok_s=batch * seq / ms * 1000, loss0=losses[0], peak_gib=mem)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    rows = [run(a.preset, prec, a.batch, a.seq, a.steps, a.device) for prec in ("bf16", "fp8")]
    base = rows[0]["ms"]
    for r in rows:
        print(f"train step {a.preset} B={a.batch} S={a.seq} {r['precision']:5s} | {r['ms']:8.1f} ms "
              f"{r['tok_s']:8.0f} tok/s | {base / r['ms']:4.2f}x bf16 | first loss {r['loss0']:.4f} | "
              f"peak {r['peak_gib']:.1f} GiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
