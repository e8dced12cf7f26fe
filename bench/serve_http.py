"""`moeco serve` under load, and what the HTTP layer costs against the engine alone.

    PYTHONPATH=src python bench/serve_http.py --model runs/tiny/model --concurrency 1,8,32 \
        --input-len 128 --output-len 64 --out results/                      (CPU, the model `make run` trains)
    PYTHONPATH=src python bench/serve_http.py --preset small --concurrency 1,32,256 \
        --input-len 512 --output-len 256 --out results/                     (one GPU, random bf16 weights)

1. Starts `moeco serve MODEL` on a free loopback port (a --preset gets random weights and a BPE
   tokenizer trained on the embedded corpus, saved to a temporary directory first).
2. For each concurrency C: `moeco bench serve` with --max-concurrency C and C x --waves requests of
   random token ids (exactly --input-len in, --output-len out, ignore_eos): TTFT, TPOT, ITL, E2EL,
   throughput.
3. HTTP overhead at the largest C: one wave of C requests through the server, all sent at once,
   against `moeco bench throughput` on C prompts of the same lengths (the engine alone, in its own
   process after the server has stopped, so each has the device to itself). Ratio = output tokens/s
   through the server / output tokens/s of the engine alone (1.0 = the server costs nothing).
Writes serve_http.json into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))


def build_preset(name: str, out: Path) -> Path:
    import torch

    from moeco.config import ModelConfig
    from moeco.model.transformer import Transformer
    from moeco.train.corpus import embedded_corpus
    from moeco.train.tokenizer import save_tokenizer, train_bpe

    cfg = ModelConfig.preset(name)
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = Transformer(cfg).to(torch.bfloat16 if dev == "cuda" else torch.float32)
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache() if dev == "cuda" else None  # the server and the offline run get the whole device
    save_tokenizer(train_bpe(embedded_corpus(), min(cfg.vocab_size, 8192)), out)
    return out


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}


def start_server(model: Path, port: int, max_num_seqs: int, extra: list[str]) -> subprocess.Popen:
    import httpx

    env = _env()
    cmd = [sys.executable, "-m", "moeco", "serve", str(model), "--port", str(port), "--served-model-name", "bench",
           "--max-num-seqs", str(max_num_seqs), "--log-level", "warning", *extra]
    proc = subprocess.Popen(cmd, env=env)
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"moeco serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("moeco serve did not start")


def load(port: int, concurrency: int, num_prompts: int, args, vocab: int, quiet: bool = False) -> dict:
    import asyncio
    import math

    from moeco.serve import bench_serve

    ns = SimpleNamespace(base_url=f"http://127.0.0.1:{port}", model="bench", endpoint="completions", api_key=None,
                         dataset="random", input_len=args.input_len, output_len=args.output_len // (8 if quiet else 1),
                         num_prompts=num_prompts, request_rate=math.inf, max_concurrency=concurrency,
                         vocab_size=vocab, tokenizer=None, timeout=3600.0, seed=concurrency)
    results, duration = asyncio.run(bench_serve.benchmark(ns, bench_serve.make_prompts(ns)))
    res = bench_serve.compute_metrics(results, duration, {})
    if quiet:
        return res
    print(f"\n--- concurrency {concurrency}, {num_prompts} requests ---")
    print(bench_serve.format_report(res, ns))
    res.pop("samples_ms")
    return {"concurrency": concurrency, **res}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint directory")
    p.add_argument("--preset", help="random weights of a preset instead (e.g. small)")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--waves", type=int, default=2, help="requests per concurrency level = C x waves (at least 4)")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--port", type=int, default=8642)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096, help="the engine's per-step budget (both runs)")
    p.add_argument("--serve-args", default="", help="extra `moeco serve` flags, space-separated")
    p.add_argument("--out", default=".")
    args = p.parse_args()
    levels = sorted(int(c) for c in args.concurrency.split(","))
    tmp = tempfile.TemporaryDirectory()
    model = Path(args.model) if args.model else build_preset(args.preset, Path(tmp.name) / args.preset)
    from tokenizers import Tokenizer

    tok = model / "tokenizer.json"
    vocab = Tokenizer.from_file(str(tok)).get_vocab_size() if tok.is_file() else 256
    proc = start_server(model, args.port, max(levels),
                        ["--max-num-batched-tokens", str(args.max_num_batched_tokens), *args.serve_args.split()])
    try:
        for c in levels:  # warm-up: CUDA graphs are captured per batch size on first use
            load(args.port, c, c, args, vocab, quiet=True)
        runs = [load(args.port, c, max(4, c * args.waves), args, vocab) for c in levels]
        one_wave = runs[-1] if args.waves == 1 and max(levels) >= 4 else load(args.port, max(levels), max(levels),
                                                                              args, vocab)
    finally:
        proc.terminate()
        proc.wait(120)
    offline_json = Path(tmp.name) / "offline.json"
    subprocess.run([sys.executable, "-m", "moeco", "bench", "throughput", str(model), "--num-prompts", str(max(levels)),
                    "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                    "--max-num-seqs", str(max(levels)), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
                    "--json", str(offline_json)],
                   env=_env(), check=True)
    offline = json.loads(offline_json.read_text())
    ratio = one_wave["output_throughput"] / offline["output_tokens_per_s"]
    print(f"\nHTTP overhead at {max(levels)} concurrent: server {one_wave['output_throughput']:.1f} output tokens/s, "
          f"engine alone {offline['output_tokens_per_s']:.1f} -> ratio {ratio:.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"model": str(args.model or f"preset:{args.preset}"), "input_len": args.input_len,
              "output_len": args.output_len, "runs": runs, "one_wave": one_wave, "offline": offline,
              "http_over_engine_ratio": ratio, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (out / "serve_http.json").write_text(json.dumps(result, indent=1))
    print(f"written: {out / 'serve_http.json'}")


if __name__ == "__main__":
    main()
