"""Where a training step's GPU time goes: torch.profiler over moeco's Trainer, kernels by category.

    PYTHONPATH=src python bench/profile_train.py --preset small --seq-len 2048 --batch 8 [--precision fp8]

Runs `--warmup` steps, profiles `--steps` more, and prints (and writes to --out) the GPU time per
kernel category (GEMM, grouped GEMM, attention, FP8 quantization, optimizer, index/scatter,
element-wise, reductions), the GPU-busy fraction of the wall time, and the top kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from moeco.train.config import TrainConfig
from moeco.train.trainer import Trainer

CATEGORIES = [  # first match wins; lower-case substrings of kernel names
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    ("grouped_gemm", ("group",)),  # also CUTLASS's GroupProblemShape (torch._grouped_mm)
    ("fp8_quant", ("quant",)),
    ("gemm", ("gemm", "sm90_xmma", "cutlass", "nvjet", "matmul", "_mm_", "wgmma", "cublas")),
    ("optimizer", ("multi_tensor", "adam", "foreach", "lpnorm")),
    ("index_scatter", ("index", "scatter", "gather", "sort", "radix", "bincount", "cumsum", "topk")),
    ("reduce", ("reduce", "norm", "softmax", "cross_entropy", "nll", "logsumexp")),
    ("copy_cast", ("copy", "cast", "cat", "fill", "memcpy", "memset")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "pointwise", "triton_poi")),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", default="runs/profile")
    p.add_argument("--set", action="append", default=[], help="extra TrainConfig overrides KEY=VALUE")
    a = p.parse_args()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig().with_overrides([
        f'model.preset="{a.preset}"', f"data.seq_len={a.seq_len}", f"train.batch_size={a.batch}",
        "train.steps=1000", f'train.precision="{a.precision}"', "log.eval_interval=0", "checkpoint.every=0",
        "train.warmup_steps=10", *a.set])
    trainer = Trainer(cfg, out / "run", overwrite=True, verbose=False)
    for _ in range(a.warmup):
        trainer.train_step()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        recs = [trainer.train_step() for _ in range(a.steps)]
        sync()
        wall_ms = (time.perf_counter() - t0) * 1000 / a.steps
    # GPU kernels only: user annotations (Optimizer.step#AdamW.step, ...) also carry device time
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
               and e.self_device_time_total > 0 and not getattr(e, "is_user_annotation", False)
               and "#" not in e.key and not e.key.startswith("ProfilerStep")]
    by_cat: dict[str, float] = defaultdict(float)
    for e in kernels:
        by_cat[category(e.key)] += e.self_device_time_total / 1000 / a.steps
    busy = sum(by_cat.values()) or 1e-9
    tag = f"{a.preset} {a.precision} B={a.batch} S={a.seq_len}"
    lines = [f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'} torch {torch.__version__} | {tag}",
             f"step wall {wall_ms:.1f} ms (profiled; unprofiled {1000 * recs[-1]['step_time_s']:.1f} ms), "
             f"GPU kernels {busy:.1f} ms = {100 * busy / wall_ms:.0f}% busy, MFU {100 * (recs[-1]['mfu'] or 0):.1f}%",
             "", f"{'category':<16}{'ms/step':>10}{'share':>8}"]
    for cat, ms in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        lines.append(f"{cat:<16}{ms:>10.2f}{100 * ms / busy:>7.1f}%")
    lines += ["", f"{'ms/step':>9} {'calls':>6}  {'category':<14} kernel"]
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[: a.top]:
        lines.append(f"{e.self_device_time_total / 1000 / a.steps:>9.2f} {e.count // a.steps:>6}  "
                     f"{category(e.key):<14} {e.key[:110]}")
    host = sorted((e for e in prof.key_averages() if e.self_cpu_time_total > 0),
                  key=lambda e: -e.self_cpu_time_total)[:12]
    lines += ["", f"{'host ms/step':>12} {'calls':>6}  op (self CPU time)"]
    lines += [f"{e.self_cpu_time_total / 1000 / a.steps:>12.2f} {e.count // a.steps:>6}  {e.key[:90]}" for e in host]
    text = "\n".join(lines)
    print(text, flush=True)
    name = f"profile_{a.preset}_{a.precision}.txt"
    (out / name).write_text(text + "\n")
    (out / name.replace(".txt", ".json")).write_text(json.dumps(
        dict(tag=tag, wall_ms=wall_ms, busy_ms=busy, by_category=by_cat), indent=1))
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
