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


def _annotation(event, name: str) -> bool:
    """User annotations (ProfilerStep#3, Optimizer.step#AdamW.step) also carry device time: not kernels."""
    return bool(getattr(event, "is_user_annotation", False)) or name.startswith(("ProfilerStep#", "Optimizer."))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--timeline", type=int, default=0, help="print this many of the largest GPU gaps in context")
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
    # (Kernel names may hold '#': PyTorch's lambda kernels, e.g. the dtype casts, are
    # "...{lambda(float)#1}...". Counting those out hid ~75 ms of a `small` step until 2026-11-29.)
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
               and e.self_device_time_total > 0 and not _annotation(e, e.key)]
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
    # Idle GPU time between consecutive kernels, charged to the kernel that came after the gap.
    dev_events = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                         and not _annotation(e, e.name)),
                        key=lambda e: e.time_range.start)
    gaps: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    prev_end, total_gap = None, 0.0
    around = []
    for i, e in enumerate(dev_events):
        if prev_end is not None and e.time_range.start > prev_end:
            g = e.time_range.start - prev_end
            if g < 50_000:  # ignore the host pauses between profiled steps
                gaps[e.name][0] += g
                gaps[e.name][1] += 1
                total_gap += g
                around.append((g, i))
        prev_end = max(prev_end or 0, e.time_range.end)
    lines += ["", f"GPU idle between kernels: {total_gap / 1000 / a.steps:.1f} ms/step; largest shares:",
              f"{'gap ms/step':>11} {'gaps':>6}  {'mean us':>8}  next kernel"]
    for name, (g, n) in sorted(gaps.items(), key=lambda kv: -kv[1][0])[:12]:
        lines.append(f"{g / 1000 / a.steps:>11.2f} {n // a.steps:>6}  {g / max(n, 1):>8.1f}  {name[:100]}")
    if a.timeline:
        lines += ["", "the largest gaps in context (duration us, name):"]
        for g, i in sorted(around, reverse=True)[:a.timeline]:
            lines.append(f"  gap {g:.0f} us")
            for e in dev_events[max(0, i - 3):i + 2]:
                mark = ">>" if e is dev_events[i] else "  "
                lines.append(f"    {mark} {e.time_range.end - e.time_range.start:8.1f}  {e.name[:110]}")
    graphed = getattr(trainer, "graphed", None)
    if graphed is not None and graphed.captured:  # GPU time of one replay alone (extra optimizer steps)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(3):
            sync()
            start.record()
            graphed.graph.replay()
            end.record()
            sync()
            times.append(start.elapsed_time(end))
        lines += ["", f"CUDA graph replay alone: {sorted(times)[1]:.1f} ms (GPU, median of 3)"]
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
