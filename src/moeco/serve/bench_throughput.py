"""`moeco bench throughput`: offline throughput of the serving engine on a checkpoint or a preset.

    moeco bench throughput runs/tiny/model --num-prompts 64 --input-len 128 --output-len 64
    moeco bench throughput --preset small --num-prompts 256 --input-len 512 --output-len 256   (random weights)

All requests are submitted at once and the engine's continuous batching runs them; prompts are
random token ids of exactly --input-len tokens (or the embedded corpus with --corpus), every request
generates exactly --output-len tokens (ignore_eos). Reported: requests/s, output tokens/s, total
tokens/s, and time per output token (TPOT: a request's decode time / (its output tokens - 1)), mean
and p99, plus TTFT.
"""

from __future__ import annotations

import json
import time

import torch

from moeco.errors import ConfigError


def add_parser(bench_sub) -> None:
    p = bench_sub.add_parser("throughput", help="offline throughput of the serving engine")
    p.add_argument("model", nargs="?", help="checkpoint directory (HF layout); or use --preset")
    p.add_argument("--preset", help="random weights of a preset instead of a checkpoint (e.g. small)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--corpus", action="store_true", help="prompts cut from the embedded corpus instead of random ids")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--speculative", choices=["mtp"], default=None)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result here")
    p.set_defaults(func=run)


def _model_and_engine(args):
    from moeco.serve.engine import EngineConfig, LLMEngine

    opts = dict(dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, speculative=args.speculative,
                cuda_graphs=not args.no_cuda_graphs)
    if args.preset:
        from moeco.config import ModelConfig
        from moeco.model.transformer import Transformer

        torch.manual_seed(args.seed)
        cfg = ModelConfig.preset(args.preset)
        dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                           ("cpu" if args.device == "auto" else args.device))
        dtype = torch.bfloat16 if (args.dtype == "auto" and dev.type == "cuda") or args.dtype in ("bf16", "bfloat16") \
            else torch.float32
        with torch.device(dev):
            model = Transformer(cfg).to(dtype)
        return LLMEngine(EngineConfig(**opts), model=model)
    if not args.model:
        raise ConfigError("pass a checkpoint directory or --preset NAME")
    return LLMEngine(EngineConfig(model_dir=args.model, **opts))


def _prompts(engine, args) -> list[list[int]]:
    g = torch.Generator().manual_seed(args.seed)
    vocab = engine.vocab_limit
    if args.corpus and engine.tokenizer is not None:
        from moeco.train.corpus import embedded_corpus

        ids = engine.tokenizer.encode("\n".join(embedded_corpus())[: 400_000]).ids
        starts = torch.randint(0, max(1, len(ids) - args.input_len), (args.num_prompts,), generator=g).tolist()
        return [ids[s:s + args.input_len] for s in starts]
    return torch.randint(0, vocab, (args.num_prompts, args.input_len), generator=g).tolist()


def run(args) -> int:
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} = {getattr(args, name)}; use an integer >= 1")
    engine = _model_and_engine(args)
    if args.input_len + args.output_len > engine.max_model_len:
        raise ConfigError(f"--input-len + --output-len = {args.input_len + args.output_len} exceeds the "
                          f"context ({engine.max_model_len})")
    prompts = _prompts(engine, args)
    result = measure(engine, prompts, args.output_len, progress=True)
    result.update(model=args.model or f"preset:{args.preset}", input_len=args.input_len, device=str(engine.device))
    print(format_result(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def measure(engine, prompts: list[list[int]], output_len: int, progress: bool = False,
            warmup: bool = True) -> dict:
    """Run every prompt to exactly output_len tokens; timing per request from the engine's steps."""
    from moeco.serve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=output_len, ignore_eos=True)
    if warmup:  # compile kernels and capture graphs outside the timed run
        for p in prompts[: min(len(prompts), engine.config.max_num_seqs)]:
            engine.add_request(p[:8], SamplingParams(max_tokens=4, ignore_eos=True))
        while engine.has_unfinished():
            engine.step()
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        task = bar.add_task("requests", total=len(prompts))
        bar.start()
    t0 = time.perf_counter()
    rids = [engine.add_request(p, params) for p in prompts]
    first, last, count = {}, {}, {r: 0 for r in rids}
    while engine.has_unfinished():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.new_token_ids:
                first.setdefault(o.request_id, now)
                last[o.request_id] = now
                count[o.request_id] += len(o.new_token_ids)
            if o.finished and bar:
                bar.advance(task)
    elapsed = time.perf_counter() - t0
    if bar:
        bar.stop()
    out_tokens = sum(count.values())
    tpot = sorted((last[r] - first[r]) / (count[r] - 1) for r in rids if count[r] > 1)
    ttft = sorted(first[r] - t0 for r in rids)
    pct = lambda xs, q: xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")  # noqa: E731
    s = engine.stats()
    return {"num_requests": len(prompts), "output_len": output_len, "elapsed_s": elapsed,
            "requests_per_s": len(prompts) / elapsed, "output_tokens_per_s": out_tokens / elapsed,
            "total_tokens_per_s": (out_tokens + sum(map(len, prompts))) / elapsed,
            "mean_tpot_ms": 1e3 * sum(tpot) / max(len(tpot), 1), "p99_tpot_ms": 1e3 * pct(tpot, 0.99),
            "mean_ttft_ms": 1e3 * sum(ttft) / len(ttft), "p99_ttft_ms": 1e3 * pct(ttft, 0.99),
            "num_preemptions": s["num_preemptions"], "spec_acceptance_rate": s["spec_acceptance_rate"],
            "cache_capacity_tokens": s["capacity_tokens"]}


def format_result(r: dict) -> str:
    lines = [f"requests: {r['num_requests']}, output tokens each: {r['output_len']}, {r['elapsed_s']:.2f} s",
             f"  requests/s          {r['requests_per_s']:10.2f}",
             f"  output tokens/s     {r['output_tokens_per_s']:10.1f}",
             f"  total tokens/s      {r['total_tokens_per_s']:10.1f}",
             f"  TPOT mean / p99 ms  {r['mean_tpot_ms']:10.2f} / {r['p99_tpot_ms']:.2f}",
             f"  TTFT mean / p99 ms  {r['mean_ttft_ms']:10.1f} / {r['p99_ttft_ms']:.1f}",
             f"  preemptions {r['num_preemptions']}, cache capacity {r['cache_capacity_tokens']:,} tokens"]
    if r.get("spec_acceptance_rate") is not None:
        lines.append(f"  MTP draft acceptance {100 * r['spec_acceptance_rate']:.1f}%")
    return "\n".join(lines)
