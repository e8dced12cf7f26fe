"""`moeco bench serve`: load an OpenAI-compatible server and measure what its users feel.

    moeco bench serve --base-url http://127.0.0.1:8000 --model runs/tiny/model \
        --input-len 128 --output-len 64 --num-prompts 200 --max-concurrency 8 --json result.json

Requests: prompts of exactly --input-len random token ids (`--dataset random`, sent as token ids
to /v1/completions) or windows of the embedded corpus (`--dataset corpus`: the Python stdlib's
documentation, cut to --input-len tokens with --tokenizer, else to ~4 characters a token), each asking
for exactly --output-len tokens (`ignore_eos`), streamed with `stream_options.include_usage` so token
counts come from the server. They arrive as a Poisson process at --request-rate requests/s (default:
all at once), at most --max-concurrency in flight.

Metrics, with vLLM's names and definitions (`vllm bench serve`), so figures compare:
    TTFT   time to first token: request sent -> first streamed chunk that carries text
    TPOT   time per output token, per request, excluding the first: (E2EL - TTFT) / (output tokens - 1)
    ITL    inter-token latency: the gaps between successive text chunks, over all requests
    E2EL   end-to-end latency: request sent -> last chunk
    request / output / total-token throughput over the benchmark's duration (first send -> last finish)
    goodput: requests per second that met every SLO given (--slo-ttft-ms, --slo-tpot-ms, --slo-e2el-ms)
Each reported as mean, median, std and p99 in ms. The client needs only httpx (no `openai` package).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

from moeco.errors import ConfigError

METRICS = ("ttft", "tpot", "itl", "e2el")
NAMES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
         "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


def add_parser(bench_sub) -> None:
    p = bench_sub.add_parser("serve", help="load generator for an OpenAI-compatible server (moeco serve, vLLM...)")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="model name the server serves (default: the first one /v1/models lists)")
    p.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--dataset", choices=["random", "corpus"], default="random")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=64, help="output tokens per request (ignore_eos)")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, help="requests in flight at most")
    p.add_argument("--vocab-size", type=int, default=256, help="random prompt ids are drawn from [0, N)")
    p.add_argument("--tokenizer", help="tokenizer.json or a model directory, to cut corpus prompts exactly")
    p.add_argument("--slo-ttft-ms", type=float)
    p.add_argument("--slo-tpot-ms", type=float)
    p.add_argument("--slo-e2el-ms", type=float)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result (metrics and per-request arrays) here")
    p.add_argument("--plot", help="write a PNG of the latency distributions here")
    p.set_defaults(func=run)


@dataclass
class RequestResult:
    success: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    start: float = 0.0
    error: str = ""


def make_prompts(args) -> list:
    rng = random.Random(args.seed)
    if args.dataset == "random":
        return [[rng.randrange(args.vocab_size) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    from moeco.train.corpus import embedded_corpus

    text = "\n".join(embedded_corpus())
    if args.tokenizer:
        from moeco.train.tokenizer import load_tokenizer

        tok = load_tokenizer(args.tokenizer)
        ids = tok.encode(text[:2_000_000]).ids
        starts = [rng.randrange(max(1, len(ids) - args.input_len)) for _ in range(args.num_prompts)]
        return [tok.decode(ids[s:s + args.input_len]) for s in starts]
    width = 4 * args.input_len
    return [text[s:s + width] for s in (rng.randrange(len(text) - width) for _ in range(args.num_prompts))]


def _payload(args, prompt) -> dict:
    body = {"model": args.model, "max_tokens": args.output_len, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def _request(client, url: str, body: dict, headers: dict) -> RequestResult:
    out = RequestResult(start=time.perf_counter())
    last = out.start
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                out.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                return out
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    out.error = str(chunk["error"].get("message"))
                    return out
                if chunk.get("usage"):
                    out.prompt_len = chunk["usage"]["prompt_tokens"]
                    out.output_tokens = chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices") or []:
                    text = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                    now = time.perf_counter()
                    if text:
                        if out.ttft == 0.0:
                            out.ttft = now - out.start
                        else:
                            out.itl.append(now - last)
                        last = now
                    elif c.get("finish_reason"):
                        last = now
        out.latency = last - out.start
        out.success = out.ttft > 0 or out.output_tokens == 0
        if not out.success:
            out.error = "the stream carried no text"
    except Exception as exc:  # connection refused, timeout, bad JSON: the request failed, the run goes on
        out.error = f"{type(exc).__name__}: {exc}"
    return out


async def _arrivals(n: int, rate: float, seed: int):
    rng = random.Random(seed + 1)
    for i in range(n):
        yield i
        if math.isfinite(rate) and i < n - 1:
            await asyncio.sleep(rng.expovariate(rate))


async def benchmark(args, prompts: list) -> tuple[list[RequestResult], float]:
    import httpx

    url = args.base_url.rstrip("/") + ("/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limit = args.max_concurrency or len(prompts)
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(timeout=httpx.Timeout(args.timeout, connect=30.0), limits=limits) as client:
        if args.model is None:
            resp = await client.get(args.base_url.rstrip("/") + "/v1/models", headers=headers)
            resp.raise_for_status()
            args.model = resp.json()["data"][0]["id"]
        probe = await _request(client, url, {**_payload(args, prompts[0]), "max_tokens": 2}, headers)
        if not probe.success:
            raise ConfigError(f"the first test request to {url} failed: {probe.error}")
        gate = asyncio.Semaphore(limit)
        bar = _progress(len(prompts))

        async def one(i):
            async with gate:
                r = await _request(client, url, _payload(args, prompts[i]), headers)
            if bar:
                bar.advance(bar.task)
            return r

        t0 = time.perf_counter()
        tasks = [asyncio.create_task(one(i)) async for i in _arrivals(len(prompts), args.request_rate, args.seed)]
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
        if bar:
            bar.stop()
    return list(results), duration


def _progress(total: int):
    try:
        from rich.progress import Progress
    except ModuleNotFoundError:
        return None
    bar = Progress(transient=True)
    bar.task = bar.add_task("requests", total=total)
    bar.start()
    return bar


def compute_metrics(results: list[RequestResult], duration: float, slo_ms: dict[str, float]) -> dict:
    """vLLM's definitions; times in ms. `slo_ms`: {"ttft"|"tpot"|"e2el": limit} for goodput."""
    import numpy as np

    ok = [r for r in results if r.success]
    samples = {m: [] for m in METRICS}
    good = 0
    for r in ok:
        tpot = (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else None
        if tpot is not None:
            samples["tpot"].append(1e3 * tpot)
        samples["ttft"].append(1e3 * r.ttft)
        samples["e2el"].append(1e3 * r.latency)
        samples["itl"] += [1e3 * x for x in r.itl]
        mine = {"ttft": 1e3 * r.ttft, "tpot": 1e3 * (tpot or 0.0), "e2el": 1e3 * r.latency}
        good += all(mine[k] <= v for k, v in slo_ms.items())
    total_in = sum(r.prompt_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    res = {"duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
           "total_input_tokens": total_in, "total_output_tokens": total_out,
           "request_throughput": len(ok) / duration,
           "request_goodput": good / duration if slo_ms else None,
           "output_throughput": total_out / duration,
           "total_token_throughput": (total_in + total_out) / duration}
    for m in METRICS:
        xs = np.asarray(samples[m] or [0.0])
        res.update({f"mean_{m}_ms": float(xs.mean()), f"median_{m}_ms": float(np.median(xs)),
                    f"std_{m}_ms": float(xs.std()), f"p99_{m}_ms": float(np.percentile(xs, 99))})
    res["samples_ms"] = samples
    return res


def format_report(res: dict, args) -> str:
    rate = "inf" if not math.isfinite(args.request_rate) else f"{args.request_rate:g}"
    w = 50
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=w, c="="),
             f"{'Traffic request rate (req/s):':<40}{rate:>10}",
             f"{'Max request concurrency:':<40}{str(args.max_concurrency or 'none'):>10}",
             f"{'Successful requests:':<40}{res['completed']:>10}",
             f"{'Failed requests:':<40}{res['failed']:>10}",
             f"{'Benchmark duration (s):':<40}{res['duration']:>10.2f}",
             f"{'Total input tokens:':<40}{res['total_input_tokens']:>10}",
             f"{'Total generated tokens:':<40}{res['total_output_tokens']:>10}",
             f"{'Request throughput (req/s):':<40}{res['request_throughput']:>10.2f}"]
    if res["request_goodput"] is not None:
        lines.append(f"{'Request goodput (req/s):':<40}{res['request_goodput']:>10.2f}")
    lines += [f"{'Output token throughput (tok/s):':<40}{res['output_throughput']:>10.2f}",
              f"{'Total Token throughput (tok/s):':<40}{res['total_token_throughput']:>10.2f}"]
    for m in METRICS:
        lines.append("{s:{c}^{n}}".format(s=NAMES[m], n=w, c="-"))
        for stat in ("mean", "median", "p99"):
            label = f"{stat.capitalize() if stat != 'p99' else 'P99'} {m.upper()} (ms):"
            lines.append(f"{label:<40}{res[f'{stat}_{m}_ms']:>10.2f}")
    lines.append("=" * w)
    return "\n".join(lines)


def plot(res: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, m in zip(axes.flat, METRICS):
        xs = res["samples_ms"][m]
        if xs:
            ax.hist(xs, bins=min(50, max(5, len(xs) // 4)), color="#4c72b0", alpha=0.85)
        for stat, style in (("mean", "-"), ("median", "--"), ("p99", ":")):
            ax.axvline(res[f"{stat}_{m}_ms"], color="k", linestyle=style, label=f"{stat} {res[f'{stat}_{m}_ms']:.1f}")
        ax.set_title(f"{m.upper()}: {NAMES[m]}", fontsize=9)
        ax.set_xlabel("ms")
        ax.set_ylabel("count")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args) -> int:
    for name in ("input_len", "output_len", "num_prompts", "vocab_size", "timeout"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} = {getattr(args, name)}; use a value >= 1")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ConfigError(f"--max-concurrency = {args.max_concurrency}; use an integer >= 1")
    if not args.request_rate > 0:
        raise ConfigError(f"--request-rate = {args.request_rate}; use a rate > 0 (inf: all at once)")
    if args.endpoint == "chat" and args.dataset == "random":
        raise ConfigError("--endpoint chat sends text: use --dataset corpus with it")
    slo = {k: getattr(args, f"slo_{k}_ms") for k in ("ttft", "tpot", "e2el") if getattr(args, f"slo_{k}_ms")}
    prompts = make_prompts(args)
    import httpx

    try:
        results, duration = asyncio.run(benchmark(args, prompts))
    except httpx.HTTPStatusError as exc:
        raise ConfigError(f"{exc.request.url} answered {exc.response.status_code}: "
                          f"{exc.response.text[:200]} (wrong --api-key or --base-url?)") from None
    except (httpx.HTTPError, OSError) as exc:
        raise ConfigError(f"cannot reach {args.base_url} ({exc}); is the server running?") from None
    res = compute_metrics(results, duration, slo)
    print(format_report(res, args))
    errors = [r.error for r in results if not r.success]
    if errors:
        print(f"{len(errors)} requests failed; first error: {errors[0]}")
    res.update(date=datetime.now(timezone.utc).isoformat(timespec="seconds"), base_url=args.base_url,
               model=args.model, endpoint=args.endpoint, dataset=args.dataset, input_len=args.input_len,
               output_len=args.output_len, num_prompts=args.num_prompts,
               request_rate=None if not math.isfinite(args.request_rate) else args.request_rate,
               max_concurrency=args.max_concurrency, slo_ms=slo, errors=errors[:20])
    if args.plot:
        plot(res, args.plot, f"{args.model} @ {args.base_url}: {args.num_prompts} requests, "
                             f"{args.input_len} in / {args.output_len} out, concurrency {args.max_concurrency or 'all'}")
        print(f"latency distributions: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
        print(f"result: {args.json}")
    return 0 if res["completed"] else 1
