"""Training throughput on one GPU: moeco's trainer (eager and torch.compile) against transformers.

    PYTHONPATH=src python bench/train_gpu.py --preset small --seq-len 2048 --batch 8

Each row times full optimizer steps of the same configuration in bf16 autocast with fp32 master
weights and AdamW: moeco's `Trainer.train_step` (LM + MTP + balance loss, bias hook) and
transformers' `DeepseekV3ForCausalLM` (LM loss only; it has no MTP), moeco on the embedded corpus,
transformers on random token ids (routing differs; the arithmetic per token does not) with the
vocabulary of moeco's eager run. MFU uses the planner's causal FLOPs-per-token for the moeco rows and the
same formula without the MTP layer for the transformers row, against the GPU's dense bf16 peak.
Prints a table and writes train_gpu.json into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from moeco.train.config import TrainConfig
from moeco.train.metrics import flops_per_token, peak_flops
from moeco.train.trainer import Trainer


def time_moeco(args, compile_: bool, run_dir: Path) -> dict:
    cfg = TrainConfig().with_overrides([
        f'model.preset="{args.preset}"', f"data.seq_len={args.seq_len}", f"train.batch_size={args.batch}",
        "train.steps=1000", "train.precision=bf16", f"train.compile={'true' if compile_ else 'false'}",
        "log.eval_interval=0", "checkpoint.every=0", "train.warmup_steps=10", *args.set])
    t0 = time.perf_counter()
    trainer = Trainer(cfg, run_dir, overwrite=True, verbose=False)
    setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    records = [trainer.train_step() for _ in range(args.warmup)]
    first = time.perf_counter() - t0
    records = [trainer.train_step() for _ in range(args.steps)]
    dt = statistics.median(r["step_time_s"] for r in records)
    tokens = args.batch * args.seq_len
    row = {"name": f"moeco {'compiled' if compile_ else 'eager'}", "step_s": dt, "tokens_per_s": tokens / dt,
           "flops_per_token": trainer.flops_per_token, "loss": records[-1]["loss"], "setup_s": setup,
           "warmup_s": first, "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30,
           "vocab_size": trainer.mcfg.vocab_size}
    trainer.close()
    del trainer
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return row


def time_transformers(args, run_dir: Path, vocab_size: int | None) -> dict:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = TrainConfig().with_overrides([f'model.preset="{args.preset}"'])
    mcfg = cfg.model_config()
    if vocab_size:  # the vocabulary moeco's run trained with (its tokenizer, padded to 128)
        mcfg = mcfg.replace(vocab_size=vocab_size)
    hf_dir = run_dir / "hf_config"
    hf_dir.mkdir(parents=True, exist_ok=True)
    (hf_dir / "config.json").write_text(json.dumps(mcfg.to_hf_dict()))
    hf_config = AutoConfig.from_pretrained(hf_dir)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="sdpa", dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, mcfg.vocab_size, (args.batch, args.seq_len + 1), device="cuda", generator=gen)

    def step():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    for _ in range(2):
        step()
    times = [step() for _ in range(args.hf_steps)]
    dt = statistics.median(times)
    no_mtp = mcfg.replace(num_nextn_predict_layers=0)
    row = {"name": f"transformers {__import__('transformers').__version__}", "step_s": dt,
           "tokens_per_s": args.batch * args.seq_len / dt, "flops_per_token": flops_per_token(no_mtp, args.seq_len),
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30, "vocab_size": mcfg.vocab_size}
    del model, opt
    torch.cuda.empty_cache()
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--hf-steps", type=int, default=4)
    p.add_argument("--out", default="runs/bench-train")
    p.add_argument("--skip", default="", help="comma list of eager,compiled,transformers to skip")
    p.add_argument("--set", action="append", default=[],
                   help="extra TrainConfig override for the moeco rows, e.g. 'train.optimizer_moments=\"bf16\"'")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name()
    peak = peak_flops(name, 0.0)
    rows = []
    plan = [("eager", lambda: time_moeco(args, False, out / "run")),
            ("transformers", lambda: time_transformers(
                args, out, next((r.get("vocab_size") for r in rows if "vocab_size" in r), None))),
            ("compiled", lambda: time_moeco(args, True, out / "run"))]
    print(f"{name}, torch {torch.__version__}, {args.preset} preset, batch {args.batch} x {args.seq_len} tokens, "
          f"bf16 autocast + fp32 AdamW", flush=True)
    for key, fn in plan:
        if key in args.skip.split(","):
            continue
        try:
            row = fn()
        except Exception as exc:  # report and keep the other rows
            row = {"name": key, "error": f"{type(exc).__name__}: {exc}"[:300]}
            torch.cuda.empty_cache()
        if "tokens_per_s" in row and peak:
            row["mfu"] = row["tokens_per_s"] * row["flops_per_token"] / peak
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "train_gpu.json").write_text(json.dumps({"device": name, "torch": torch.__version__,
                                                        "args": vars(args), "rows": rows}, indent=2))
    base = next((r for r in rows if r["name"].startswith("transformers") and "tokens_per_s" in r), None)
    print(f"\n{'run':<24}{'tokens/s':>12}{'step s':>10}{'MFU':>8}{'vs HF':>8}{'mem GB':>9}")
    for r in rows:
        if "tokens_per_s" not in r:
            print(f"{r['name']:<24} error: {r['error']}")
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "-"
        print(f"{r['name']:<24}{r['tokens_per_s']:>12,.0f}{r['step_s']:>10.3f}{mfu:>8}{ratio:>8}{r['peak_mem_gb']:>9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
