"""The expert-parallel dispatchers' local overhead on one rank, against LocalDispatcher (one device).

    python bench/ep_local.py                      # DeepSeek-V3's MoE layer on one GPU, 128 / 1024 / 4096 tokens
    python bench/ep_local.py --backward --json out.json
    python bench/ep_local.py --small              # a CPU-sized layer (gloo), well under a minute

One MoE layer (router, routed experts, shared experts) at DeepSeek-V3's shapes by default (D = 7168,
256 routed experts, top-8 in 4 of 8 groups, expert width 2048, 1 shared expert; BF16 on CUDA, fp32
on CPU), random weights (a near-balanced load), run on a process group of one rank (NCCL on CUDA,
gloo on CPU, a FileStore rendezvous) so that every expert is local and nothing crosses a link:
whatever the expert-parallel dispatchers cost beyond LocalDispatcher is their local machinery.

    local     LocalDispatcher: a sort by expert, a gather, and the weighted gather-sum back
    direct    AllToAllDispatcher: + count exchange (all_to_all_single of P x L counts, read back to
              the host for the split sizes), the payload all_to_all (to itself), the receiver's
              sort by local expert, and combine's three-level sum (moeco.parallel.dispatch.SumOrder)
    two-hop   TwoHopDispatcher: two count exchanges and two all_to_alls each way (hop 1, hop 2), the
              token metadata (ids, source, gate weights) sent along, and the per-rank/node/token sums
    direct fp8  direct with the 1x128 E4M3 payload: + quantize before and dequantize after the all_to_all

Timing: the host wall clock around one layer call, synchronized before and after (on CUDA
torch.cuda.synchronize): what an eager caller waits. bench/_timing.py's CUDA-graph timer cannot
serve: the dispatchers read their split sizes back to the host, which a graph cannot capture. The
dispatchers take turns, one call each per round, for --reps rounds after --warmup (so a machine's
drift hits all alike); `layer ms` is the median over rounds, `overhead` the median over rounds of
(this dispatcher's call - LocalDispatcher's call in the same round).
Split of the overhead, from a second, instrumented pass that synchronizes around the pieces
(moeco.parallel.dispatch.exchange_counts and moeco.parallel.route.all_to_all_rows, backward included):

    count exchange   exchange_counts calls (the collective; the host read of the counts follows it)
    all_to_all       all_to_all_rows calls: payload, metadata, and in --backward the gradients' reverse
    rest             overhead - count exchange - all_to_all: permutations, sorts, gathers, the sums,
                     FP8 quantization, host reads (negative within noise when the overhead is small)

`max err vs local`: max |y - y_local| / max |y_local| of one forward (rounding: the sums run in
another order; FP8: the payload's quantization). `layer TFLOPS` is LocalDispatcher's layer at 2 FLOPs
per multiply-add of the router, routed and shared experts (x 3 with --backward), for the distance to
the hardware. `x local` is a ratio of medians, `overhead` a median of differences: they can disagree
in sign when the overhead is within the noise.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from moeco.config import ModelConfig
from moeco.model.moe import LocalDispatcher, MoE
from moeco.precision import DEFAULT_RECIPE

V3 = dict(hidden=7168, experts=256, topk=8, inter=2048, shared=1, groups=8, topk_groups=4)
SMALL = dict(hidden=256, experts=16, topk=4, inter=128, shared=1, groups=4, topk_groups=2)
TOKENS = {"cuda": [128, 1024, 4096], "cpu": [64, 256, 1024]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_ms(fn, device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - t0) * 1e3


class Pieces:
    """Wraps the dispatchers' count exchange and all_to_all; milliseconds summed per piece (synchronized)."""

    def __init__(self, device: torch.device):
        from moeco.parallel import dispatch, route

        self.device, self.ms = device, defaultdict(float)
        self._patched = [(dispatch, "exchange_counts", "count exchange"), (route, "all_to_all_rows", "all_to_all")]
        self._orig = [getattr(mod, attr) for mod, attr, _ in self._patched]

    def __enter__(self):
        for (mod, attr, name), orig in zip(self._patched, self._orig):
            setattr(mod, attr, self._timed(name, orig))
        return self

    def __exit__(self, *exc):
        for (mod, attr, _), orig in zip(self._patched, self._orig):
            setattr(mod, attr, orig)

    def _timed(self, name, fn):
        def timed(*args, **kwargs):
            sync(self.device)
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            sync(self.device)
            self.ms[name] += (time.perf_counter() - t0) * 1e3
            return out
        return timed


def init_one_rank(device: torch.device, store_dir: str) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = dist.FileStore(str(Path(store_dir) / "store"), 1)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)


def build_layer(shape: dict, device: torch.device, dtype: torch.dtype, seed: int) -> MoE:
    groups = shape["groups"] if shape["experts"] % shape["groups"] == 0 else 1
    config = ModelConfig.preset("deepseek-v3").replace(
        hidden_size=shape["hidden"], n_routed_experts=shape["experts"], num_experts_per_tok=shape["topk"],
        moe_intermediate_size=shape["inter"], n_shared_experts=shape["shared"], n_group=groups,
        topk_group=min(shape["topk_groups"], groups))
    torch.manual_seed(seed)
    with torch.device(device):
        moe = MoE(config, DEFAULT_RECIPE)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return moe.to(dtype).eval()  # eval: the router leaves its load counters alone


def dispatchers(fp8: bool) -> dict:
    from moeco.parallel.dispatch import AllToAllDispatcher, TwoHopDispatcher
    from moeco.parallel.mesh import Mesh, MeshSpec

    mesh = Mesh(MeshSpec.from_env(ep=1, gpus_per_node=1, env={"WORLD_SIZE": "1", "RANK": "0",
                                                               "LOCAL_WORLD_SIZE": "1"}))
    out = {"local": LocalDispatcher(), "direct": AllToAllDispatcher(mesh), "two-hop": TwoHopDispatcher(mesh)}
    if fp8:
        out["direct fp8"] = AllToAllDispatcher(mesh, fp8=True)
    for d in out.values():
        if hasattr(d, "counter"):
            d.counter.enabled = False  # byte bookkeeping is not what is measured here
    return out


def layer_flops(shape: dict, tokens: int) -> float:
    D, E, K, F, S = (shape[k] for k in ("hidden", "experts", "topk", "inter", "shared"))
    return 2 * tokens * (D * E + K * 3 * D * F + S * 3 * D * F)


def run(a) -> dict:
    cuda = torch.cuda.is_available() and not a.cpu
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(a.threads)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    shape = {**(SMALL if a.small else V3), **{k: getattr(a, k) for k in V3 if getattr(a, k) is not None}}
    tokens = a.tokens or TOKENS[device.type]
    with tempfile.TemporaryDirectory() as store_dir:
        init_one_rank(device, store_dir)
        try:
            return _measure(a, device, dtype, shape, tokens)
        finally:
            dist.destroy_process_group()


def _measure(a, device, dtype, shape, tokens) -> dict:
    moe = build_layer(shape, device, dtype, a.seed)
    rows, skipped = [], {}
    for T in tokens:
        g = torch.Generator(device=device).manual_seed(a.seed + T)
        x = torch.randn(1, T, shape["hidden"], device=device, dtype=dtype, generator=g)
        dy = torch.randn(1, T, shape["hidden"], device=device, dtype=dtype, generator=g)

        def call():
            if not a.backward:
                with torch.no_grad():
                    return moe(x)
            for p in moe.parameters():
                p.grad = None
            xg = x.detach().requires_grad_()
            moe(xg).backward(dy)

        runs, outputs = {}, {}
        for name, d in dispatchers(not a.no_fp8).items():
            if name in skipped:
                continue
            moe.dispatcher = d
            try:
                for _ in range(a.warmup):
                    call()
                with torch.no_grad():
                    outputs[name] = moe(x).float()
            except Exception as exc:  # noqa: BLE001 - e.g. no FP8 on this device: reported, not fatal
                skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                continue
            runs[name] = d
        times = defaultdict(list)
        for _ in range(a.reps):  # round-robin
            for name, d in runs.items():
                moe.dispatcher = d
                times[name].append(call_ms(call, device))
        for name, d in runs.items():
            moe.dispatcher = d
            with Pieces(device) as pieces:
                for _ in range(a.reps):
                    call()
            parts = {k: v / a.reps for k, v in pieces.ms.items()}
            ms = statistics.median(times[name])
            err = (outputs[name] - outputs["local"]).abs().max() / outputs["local"].abs().max()
            row = {"tokens": T, "dispatcher": name, "ms": ms, "rel_err": float(err)}
            if name == "local":
                row["tflops"] = layer_flops(shape, T) * (3 if a.backward else 1) / ms / 1e9
            else:
                base = times["local"]
                row |= {"x_local": ms / statistics.median(base),
                        "overhead_ms": statistics.median(t - b for t, b in zip(times[name], base)),
                        "count_exchange_ms": parts.get("count exchange", 0.0),
                        "all_to_all_ms": parts.get("all_to_all", 0.0)}
                row["rest_ms"] = row["overhead_ms"] - row["count_exchange_ms"] - row["all_to_all_ms"]
            rows.append(row)
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
            f"CPU ({torch.get_num_threads()} threads)", "backend": dist.get_backend(), "dtype": str(dtype),
            "shape": shape, "backward": a.backward, "reps": a.reps, "torch": torch.__version__,
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "rows": rows,
            "skipped": skipped}


def markdown(res: dict) -> str:
    s = res["shape"]
    lines = [f"{res['device']}, {res['backend']}, world 1, {res['dtype'].replace('torch.', '')}, "
             f"{'forward + backward' if res['backward'] else 'forward'}; D = {s['hidden']}, {s['experts']} experts, "
             f"top-{s['topk']}, expert width {s['inter']}, {s['shared']} shared; median of {res['reps']}; "
             f"{res['date']}, torch {res['torch']}", "",
             "| tokens | dispatcher | layer ms | x local | overhead ms | count exchange ms | all_to_all ms | "
             "rest ms | layer TFLOPS | max err vs local |", "|---|---|---|---|---|---|---|---|---|---|"]

    def f(v, fmt=".3f"):
        return "" if v is None else format(v, fmt)

    for r in res["rows"]:
        lines.append(f"| {r['tokens']} | {r['dispatcher']} | {f(r['ms'])} | {f(r.get('x_local'), '.2f')} | "
                     f"{f(r.get('overhead_ms'))} | {f(r.get('count_exchange_ms'))} | {f(r.get('all_to_all_ms'))} | "
                     f"{f(r.get('rest_ms'))} | {f(r.get('tflops'), '.2f')} | "
                     f"{f(r['rel_err'], '.1e') if r['dispatcher'] != 'local' else ''} |")
    for name, why in res["skipped"].items():
        lines.append(f"\n{name}: skipped ({why})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="a CPU-sized layer: " +
                    ", ".join(f"{k} {v}" for k, v in SMALL.items()))
    for k in ("hidden", "experts", "topk", "inter", "shared", "groups", "topk_groups"):
        ap.add_argument(f"--{k.replace('_', '-')}", dest=k, type=int, help=f"default {V3[k]} (V3)")
    ap.add_argument("--tokens", type=int, nargs="+", help="tokens per call (default 128 1024 4096 on CUDA, "
                                                          "64 256 1024 on CPU)")
    ap.add_argument("--backward", action="store_true", help="time forward + backward")
    ap.add_argument("--dtype", choices=("bf16", "fp32"), help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even where CUDA is present")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: steadier on a shared machine)")
    ap.add_argument("--no-fp8", action="store_true", help="leave out the FP8-payload direct dispatcher")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    a = ap.parse_args(argv)
    res = run(a)
    print(markdown(res))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
        print(f"written: {a.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
