"""Colocated against disaggregated serving under a mixed load, in one run, with the planner beside it.

    PYTHONPATH=src python bench/serve_disagg.py --model runs/tiny/model --cache-bytes 67108864   (CPU)
    PYTHONPATH=src python bench/serve_disagg.py --preset small --chat-in 256 --chat-out 128 \
        --chat-concurrency 16 --chat-prompts 64 --long-in 4096 --long-prompts 16 --cache-bytes 8e9 --out DIR
                                                                  (one GPU: both workers share it)

For each deployment (`moeco serve MODEL` and `moeco serve MODEL --disaggregate`, the same flags):
start it on a free loopback port, warm it up (CUDA graphs, allocator), then run two loads at once
with `moeco bench serve`'s client: chats (--chat-in tokens in, --chat-out out, --chat-concurrency at a
time) and long prompts (--long-in in, --long-out out, one at a time). Reported per deployment: the
chats' TPOT, inter-token latency and TTFT (median and p99, vLLM's definitions), their output tokens/s,
and the long prompts' TTFT; for the disaggregated one also the router's hand-over counters (bytes,
tokens, seconds), bytes per token against `ModelConfig.kv_cache_bytes_per_token`, and per request
against the planner's `handover_bytes_per_request` (`moeco plan serve`, same lengths). The planner's
prefill tokens/s and decode step for the GPU are printed beside the measured long-prompt prefill rate
and chat TPOT (a first sizing: the planner assumes the GPU to itself, FP8-free bf16 weights here).

Workers hand over through gloo (host memory): two processes on one GPU cannot form an NCCL pair.
Writes serve_disagg.json into --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

from serve_http import build_preset, start_server  # noqa: E402


def _ns(port: int, input_len: int, output_len: int, n: int, concurrency: int, vocab: int, seed: int):
    return SimpleNamespace(base_url=f"http://127.0.0.1:{port}", model="bench", endpoint="completions", api_key=None,
                           dataset="random", input_len=input_len, output_len=output_len, num_prompts=n,
                           request_rate=math.inf, max_concurrency=concurrency, vocab_size=vocab, tokenizer=None,
                           timeout=3600.0, seed=seed)


async def _mixed(port: int, args, vocab: int) -> tuple[dict, dict]:
    from moeco.serve import bench_serve

    chat = _ns(port, args.chat_in, args.chat_out, args.chat_prompts, args.chat_concurrency, vocab, 1)
    long = _ns(port, args.long_in, args.long_out, args.long_prompts, 1, vocab, 2)
    (rc, dc), (rl, dl) = await asyncio.gather(bench_serve.benchmark(chat, bench_serve.make_prompts(chat)),
                                              bench_serve.benchmark(long, bench_serve.make_prompts(long)))
    m_chat, m_long = bench_serve.compute_metrics(rc, dc, {}), bench_serve.compute_metrics(rl, dl, {})
    for m in (m_chat, m_long):
        m.pop("samples_ms", None)
    return m_chat, m_long


def _warm(port: int, args, vocab: int) -> None:
    from moeco.serve import bench_serve

    for c in sorted({1, args.chat_concurrency, args.chat_concurrency + 1}):
        ns = _ns(port, args.chat_in, 4, c, c, vocab, 100 + c)
        asyncio.run(bench_serve.benchmark(ns, bench_serve.make_prompts(ns)))
    ns = _ns(port, args.long_in, 2, 1, 1, vocab, 99)
    asyncio.run(bench_serve.benchmark(ns, bench_serve.make_prompts(ns)))


def _transfer_counters(port: int) -> dict:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = {"bytes": 0.0, "tokens": 0.0, "seconds": 0.0}
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    for fam in text_string_to_metric_families(text):
        for key in out:
            if fam.name == f"moeco:disagg_transfer_{key}":
                out[key] += sum(s.value for s in fam.samples if s.name.endswith("_total")
                                and s.labels.get("role", "prefill") == "prefill")
    return out


def run_one(model: Path, args, vocab: int, disaggregate: bool) -> dict:
    extra = ["--max-num-batched-tokens", str(args.max_num_batched_tokens),
             *(["--cache-bytes", str(int(float(args.cache_bytes)))] if args.cache_bytes else []),
             *args.serve_args.split(), *(["--disaggregate"] if disaggregate else [])]
    proc = start_server(model, args.port, args.max_num_seqs, extra)
    try:
        _warm(args.port, args, vocab)
        before = _transfer_counters(args.port) if disaggregate else None
        t0 = time.perf_counter()
        chat, long = asyncio.run(_mixed(args.port, args, vocab))
        wall = time.perf_counter() - t0
        moved = None
        if disaggregate:
            after = _transfer_counters(args.port)
            moved = {k: after[k] - before[k] for k in after}
    finally:
        proc.terminate()
        proc.wait(120)
    return {"deployment": "disaggregated" if disaggregate else "colocated", "wall_s": wall, "chats": chat,
            "long": long, "transfer": moved}


def planner(model: Path, args) -> dict | None:
    try:
        from moeco.config import ModelConfig
        from moeco.plan.hardware import get_device
        from moeco.plan.serving import plan_serve

        import torch

        if not torch.cuda.is_available():
            return None
        name = "H200" if "H200" in torch.cuda.get_device_name() else torch.cuda.get_device_name()
        cfg = ModelConfig.from_hf(model / "config.json")
        return plan_serve(cfg, get_device(name), rate=1.0, input_len=args.long_in, output_len=args.long_out,
                          precision="bf16")
    except Exception as e:  # the planner is context, not the measurement
        print(f"(planner skipped: {e})")
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory")
    p.add_argument("--preset", help="random weights of a preset instead (e.g. small)")
    p.add_argument("--chat-in", type=int, default=32)
    p.add_argument("--chat-out", type=int, default=64)
    p.add_argument("--chat-concurrency", type=int, default=4)
    p.add_argument("--chat-prompts", type=int, default=24)
    p.add_argument("--long-in", type=int, default=768)
    p.add_argument("--long-out", type=int, default=8)
    p.add_argument("--long-prompts", type=int, default=12)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--cache-bytes", help="latent pool of each engine (each worker gets this much)")
    p.add_argument("--serve-args", default="", help="extra `moeco serve` flags, space-separated")
    p.add_argument("--port", type=int, default=8652)
    p.add_argument("--out", default=".")
    args = p.parse_args()
    if not (args.model or args.preset):
        raise SystemExit("give --model DIR or --preset NAME")
    tmp = tempfile.TemporaryDirectory()
    model = Path(args.model) if args.model else build_preset(args.preset, Path(tmp.name) / args.preset)
    from tokenizers import Tokenizer

    from moeco.config import ModelConfig

    tok = model / "tokenizer.json"
    vocab = Tokenizer.from_file(str(tok)).get_vocab_size() if tok.is_file() else 256
    runs = [run_one(model, args, vocab, d) for d in (False, True)]
    cfg = ModelConfig.from_hf(model / "config.json")
    plan = planner(model, args)
    print(f"\nchats {args.chat_in} in / {args.chat_out} out, {args.chat_concurrency} at a time; long prompts "
          f"{args.long_in} in / {args.long_out} out, one at a time")
    print("| deployment | chat TPOT p50 / p99 ms | chat ITL p99 ms | chat TTFT p50 / p99 ms | chat output tok/s "
          "| long TTFT p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        c, lg = r["chats"], r["long"]
        print(f"| {r['deployment']} | {c['median_tpot_ms']:.1f} / {c['p99_tpot_ms']:.1f} | {c['p99_itl_ms']:.1f} | "
              f"{c['median_ttft_ms']:.0f} / {c['p99_ttft_ms']:.0f} | {c['output_throughput']:.0f} | "
              f"{lg['median_ttft_ms']:.0f} / {lg['p99_ttft_ms']:.0f} |")
    t = runs[1]["transfer"]
    per_token = t["bytes"] / max(t["tokens"], 1)
    print(f"\nhand-over: {t['bytes'] / 1e6:.1f} MB, {t['tokens']:.0f} tokens, {t['seconds']:.3f} s of sending "
          f"({t['bytes'] / max(t['seconds'], 1e-9) / 1e9:.2f} GB/s); {per_token:.0f} bytes/token vs "
          f"kv_cache_bytes_per_token {cfg.kv_cache_bytes_per_token(cache_value_bytes())}")
    if plan:
        print(f"planner ({plan['device']}, bf16): hand-over {plan['handover_bytes_per_request'] / 1e6:.2f} MB per "
              f"{args.long_in}-token prompt (measured {per_token * args.long_in / 1e6:.2f}); prefill "
              f"{plan['prefill_tokens_per_s_per_gpu']:.0f} tokens/s per GPU, TTFT {plan['ttft_ms_no_queue']:.1f} ms "
              f"(measured long-prompt TTFT p50: colocated {runs[0]['long']['median_ttft_ms']:.0f}, disaggregated "
              f"{runs[1]['long']['median_ttft_ms']:.0f} ms); hand-over of one long prompt "
              f"{plan['handover_ms_per_request']:.2f} ms at 50 GB/s, measured "
              f"{per_token * args.long_in / max(t['bytes'] / max(t['seconds'], 1e-9), 1) * 1e3:.1f} ms")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": str(args.model or f"preset:{args.preset}"), "args": vars(args), "runs": runs, "planner": plan,
              "bytes_per_token": per_token, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (out / "serve_disagg.json").write_text(json.dumps(result, indent=1, default=str))
    print(f"written: {out / 'serve_disagg.json'}")


def cache_value_bytes() -> int:
    """Bytes per cached value under `--dtype auto`: bfloat16 on CUDA, float32 on CPU."""
    import torch

    return 2 if torch.cuda.is_available() else 4


if __name__ == "__main__":
    main()
