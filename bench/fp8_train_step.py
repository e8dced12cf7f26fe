"""One training step of a preset in FP8 and in BF16, eager, CUDA-graphed and compiled, on one GPU.

    PYTHONPATH=src python bench/fp8_train_step.py --preset small --batch 8 --seq 2048 \
        [--modes eager,graph,compiled,compiled+graph] [--precisions bf16,fp8]

Every row is moeco's own `Trainer.train_step` (the step `moeco train` runs: LM + MTP + balance
loss, clipping, AdamW, the bias hook) on the embedded corpus, FP32 master weights, bf16 autocast;
the fp8 rows build their Linears and routed experts through the FP8 recipe and (as DeepSeek-V3)
keep AdamW's moments in BF16, the bf16 rows keep fused torch AdamW with FP32 moments (the trainer's
defaults for each precision). Modes: `graph` = train.cuda_graph (steps 1-2 eager, the rest one
replayed CUDA graph), `compiled` = train.compile (each block compiled, FP8 GEMMs eager inside).
Prints, per row, the median step time over --steps timed steps after --warmup, tokens/s, MFU
(the planner's FLOPs per token without MTP, against the GPU's dense BF16 peak), the ratio to the
bf16 eager row, peak memory and the loss at the last step. Writes fp8_train_step.json to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moeco.train.config import TrainConfig
from moeco.train.trainer import Trainer

MODES = {"eager": (False, False), "graph": (False, True), "compiled": (True, False), "compiled+graph": (True, True)}


def run(args, precision: str, mode: str, out: Path) -> dict:
    compile_, graph = MODES[mode]
    cfg = TrainConfig().with_overrides([
        f'model.preset="{args.preset}"', f"data.seq_len={args.seq}", f"train.batch_size={args.batch}",
        "train.steps=1000", f'train.precision="{precision}"', f"train.compile={str(compile_).lower()}",
        f"train.cuda_graph={str(graph).lower()}", "log.eval_interval=0", "checkpoint.every=0",
        "train.warmup_steps=10", *args.set])
    trainer = Trainer(cfg, out / "run", overwrite=True, verbose=False)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        trainer.train_step()
    warm_s = time.perf_counter() - t0
    recs = [trainer.train_step() for _ in range(args.steps)]
    step_s = statistics.median(r["step_time_s"] for r in recs)
    row = dict(precision=precision, mode=mode, step_ms=1000 * step_s, tok_s=args.batch * args.seq / step_s,
               mfu=recs[-1]["mfu"] and recs[-1]["mfu"] * recs[-1]["step_time_s"] / step_s,
               loss=recs[-1]["loss"], warmup_s=warm_s, peak_gib=torch.cuda.max_memory_allocated() / 2**30,
               moments=cfg.moment_dtype())
    trainer.close()
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--warmup", type=int, default=4, help="untimed steps (include the capture and compile)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--modes", default="eager,graph")
    p.add_argument("--precisions", default="bf16,fp8")
    p.add_argument("--out", default="runs/bench-fp8-step")
    p.add_argument("--set", action="append", default=[], help="extra TrainConfig override for every row")
    p.add_argument("--one", help=argparse.SUPPRESS)  # PRECISION:MODE:JSON, run by main in a child process
    a = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.one:
        precision, mode, path = a.one.split(":", 2)
        Path(path).write_text(json.dumps(run(a, precision, mode, out)))
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {a.preset}, batch {a.batch} x {a.seq} tokens; "
          "each row in its own process", flush=True)
    rows, base = [], None
    passthrough = [f"--preset={a.preset}", f"--batch={a.batch}", f"--seq={a.seq}", f"--warmup={a.warmup}",
                   f"--steps={a.steps}", f"--out={a.out}"] + [f"--set={x}" for x in a.set]
    for precision in a.precisions.split(","):
        for mode in a.modes.split(","):
            # A failed CUDA-graph capture can leave the process's CUDA state unusable: one process per row.
            with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
                proc = subprocess.run([sys.executable, __file__, *passthrough, f"--one={precision}:{mode}:{tmp.name}"],
                                      capture_output=True, text=True)
                text = Path(tmp.name).read_text() if proc.returncode == 0 else ""
            if not text:
                err = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
                print(f"{precision:5s} {mode:15s} | failed: {err[-1][:240] if err else proc.returncode}", flush=True)
                continue
            r = json.loads(text)
            rows.append(r)
            if precision == "bf16" and mode == "eager":
                base = r["step_ms"]
            ratio = f"{base / r['step_ms']:5.2f}x" if base else "   - "
            print(f"{precision:5s} {mode:15s} | {r['step_ms']:7.1f} ms {r['tok_s']:8.0f} tok/s "
                  f"MFU {100 * (r['mfu'] or 0):5.1f}% | {ratio} bf16 eager | peak {r['peak_gib']:5.1f} GiB | "
                  f"loss {r['loss']:.4f} | warmup {r['warmup_s']:.0f} s | moments {r['moments']}", flush=True)
    (out / "fp8_train_step.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
