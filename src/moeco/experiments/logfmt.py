"""`moeco experiment logfmt`: wire codecs for the MoE's dispatch and combine, measured three ways.

DeepSeek-V3's ISCA'25 paper (section 3.2) proposes LogFMT-nBit for what crosses the network and
reports, without numbers, that LogFMT-8 trains better than E4M3 or E5M2 and that LogFMT-10 matches a
BF16 combine; fusing encode/decode with the all-to-all cost 50-100% overhead on Hopper.

(a) error: tensors captured at the two wire points of a trained moeco model on held-out text
    (dispatch: x_TD entering each MoE layer; combine: each expert output y_CD before the weighted
    sum), for every codec c:
        rel. RMS = ||c(x) - x|| / ||x||,  max = max|c(x) - x| / max|x|,  bias = mean(c(x) - x) / mean|x|
    plus the held-out loss of that model with c applied at both points (inference only).
(b) training: the same short run once per codec, c applied at dispatch and combine (or one of them,
    --where), straight-through gradients (moeco.comm.CodecDispatcher); the final held-out loss and
    its gap to the uncoded run ("none": the model's own precision, float32 on CPU). With --seeds N
    every codec trains N times (seeds SEED..SEED+N-1) and each gap is paired with the uncoded run of
    its seed: the table gives the mean gap and its spread over the seeds.
(c) speed: encode + decode of a (tokens, hidden) BF16 tensor, as GB/s of BF16 input and as the
    overhead it would add to an all-to-all moving the coded payload at 50 GB/s (one 400 Gb/s NIC):
        overhead = t_codec / (payload bytes / 50 GB/s)
    On a CPU this shows only the method; the GPU figure needs the Triton kernel on a GPU.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from moeco.comm import CodecDispatcher, get_codec
from moeco.experiments import common
from moeco.train.metrics import read_metrics

NAME = "logfmt"
CODECS = ("none", "bf16", "e4m3", "e5m2", "logfmt8", "logfmt10")
TRAIN_CODECS = ("none", "e4m3", "e5m2", "logfmt8", "logfmt10")  # bf16 rounding of a float32 model ~ none


def add_args(p) -> None:
    common.add_common_args(p, steps=40)
    common.add_run_arg(p)
    common.add_seeds_arg(p)
    p.add_argument("--codecs", nargs="+", default=list(CODECS),
                   help=f"codecs of the error and speed parts (default {' '.join(CODECS)})")
    p.add_argument("--train-codecs", nargs="+", default=list(TRAIN_CODECS),
                   help=f"codecs of the training runs (default {' '.join(TRAIN_CODECS)}; none = the base run)")
    p.add_argument("--where", choices=("both", "combine", "dispatch"), default="both",
                   help="which wire point the training runs code (default both)")
    p.add_argument("--skip", nargs="*", default=[], choices=("error", "training", "speed"), help="parts to leave out")
    p.add_argument("--speed-shape", type=int, nargs=2, default=[1024, 7168], metavar=("TOKENS", "HIDDEN"),
                   help="tensor of the speed test (default 1024 7168: DeepSeek-V3's hidden size)")


class _Capture:
    """A dispatcher wrapper that keeps what would cross the wire."""

    def __init__(self, inner, store: dict):
        self.inner, self.store = inner, store

    def dispatch(self, x_TD, routing, n_experts):
        self.store["dispatch"].append(x_TD.detach().clone())
        return self.inner.dispatch(x_TD, routing, n_experts)

    def combine(self, y_CD, *args, **kwargs):
        self.store["combine"].append(y_CD.detach().clone())
        return self.inner.combine(y_CD, *args, **kwargs)


def _set_dispatchers(model, make) -> list:
    old = []
    for _, moe in model.moe_layers():
        old.append(moe.dispatcher)
        moe.dispatcher = make(moe.dispatcher)
    return old


def _restore(model, old) -> None:
    for (_, moe), d in zip(model.moe_layers(), old):
        moe.dispatcher = d


@torch.no_grad()
def error_table(run_dir, codecs) -> dict:
    trained = common.load_run(run_dir, max_val=32)
    model, val = trained.model, trained.val_BS
    store = {"dispatch": [], "combine": []}
    old = _set_dispatchers(model, lambda d: _Capture(d, store))
    base_loss = common.val_loss(model, val[:16])
    _restore(model, old)
    tensors = {k: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]).bfloat16() for k, v in store.items()}
    out = {"val_loss_uncoded": base_loss, "points": {}}
    for point, x in tensors.items():
        xf = x.float()
        a = xf.abs().reshape(-1, 128)
        nz = torch.where(a > 0, a, torch.inf).amin(-1)
        span = (a.amax(-1) / nz)[torch.isfinite(nz)].log2()
        out["points"][point] = {"elements": x.numel(), "tile_range_log2_median": float(span.median()),
                                "tile_range_log2_p99": float(span.quantile(0.99)), "codecs": {}}
        for name in codecs:
            c = get_codec(name)
            if c is None:
                continue
            y = c.decode(c.encode(x)).float()
            e = y - xf
            out["points"][point]["codecs"][name] = {
                "rel_rms": float(e.norm() / xf.norm()), "max": float(e.abs().max() / xf.abs().max()),
                "bias": float(e.mean() / xf.abs().mean()), "bytes_per_element": c.bytes_per_element}
    for name in codecs:
        if get_codec(name) is None:
            continue
        old = _set_dispatchers(model, lambda d: CodecDispatcher(d, name, name))
        out.setdefault("val_loss_coded", {})[name] = common.val_loss(model, val[:16])
        _restore(model, old)
    return out


def training(args, out, codecs, base: Path | None) -> dict:
    """Per codec: the first seed's run (curve, loss, gap) and, over every seed of --seeds, the paired gaps."""
    results, losses, tok = {}, {name: {} for name in codecs}, None
    for sargs in common.seed_args(args):
        for name in codecs:
            if name == "none" and base is not None and not getattr(args, "run", None) and sargs.seed == args.seed:
                r = {"val_loss": None, "dir": str(base), "wall_s": None,
                     "records": read_metrics(base / "metrics.jsonl")}  # the base run is this run
                r["val_loss"] = [x["val_loss"] for x in r["records"] if "val_loss" in x][-1]
            else:
                sets = []
                if args.where in ("both", "dispatch"):
                    sets.append(f'parallel.dispatch_codec="{name}"')
                if args.where in ("both", "combine"):
                    sets.append(f'parallel.combine_codec="{name}"')
                r = common.train_run(sargs, out, common.run_name(f"train-{name}", sargs, args.seed), *sets,
                                     tokenizer=tok)
            tok = tok or Path(r["dir"]) / "tokenizer"
            losses[name][sargs.seed] = r["val_loss"]
            if sargs.seed == args.seed:
                curve = [(rec["step"], rec["val_loss"]) for rec in r["records"] if "val_loss" in rec]
                results[name] = {"val_loss": r["val_loss"], "curve": curve, "wall_s": r["wall_s"], "dir": r["dir"],
                                 "train_loss": [(rec["step"], rec["lm_loss"]) for rec in r["records"]]}
    ref = "none" if "none" in results else "bf16" if "bf16" in results else None
    paired = common.paired_gaps(losses, ref) if ref else {}
    for name, r in results.items():
        r["gap"] = r["val_loss"] - results[ref]["val_loss"] if ref else None
        r["gap_pct"] = 100 * r["gap"] / results[ref]["val_loss"] if ref else None
        r["val_loss_by_seed"] = losses[name]
        r.update(paired.get(name, {}))
    return results


def _timeit(fn, min_time: float = 0.5) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return dt / n


@torch.no_grad()
def speed(shape, codecs) -> dict:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(*shape, device=dev).bfloat16()
    out = {"shape": list(shape), "device": common.machine(), "codecs": {}}
    for name in codecs:
        c = get_codec(name)
        if c is None or name == "bf16":
            continue
        t = _timeit(lambda: c.decode(c.encode(x)))
        payload = c.encode(x).nbytes
        out["codecs"][name] = {"encode_decode_s": t, "GB_per_s_of_bf16_input": x.numel() * 2 / t / 1e9,
                               "payload_bytes": payload,
                               "overhead_vs_50GBps_all_to_all": t / (payload / 50e9)}
    return out


def run(args) -> dict:
    common.check_positive(args, "steps", "batch_size", "seq_len", "seeds")
    for name in args.codecs:
        get_codec(name, "--codecs")
    for name in args.train_codecs:
        get_codec(name, "--train-codecs")
    out = common.out_dir(args, NAME)
    payload, tables = {}, []
    base = common.base_run(args, out) if ("error" not in args.skip or "training" not in args.skip) else None
    if "error" not in args.skip:
        err = payload["error"] = error_table(base, args.codecs)
        rows = [[point, name, r["bytes_per_element"], 100 * r["rel_rms"], 100 * r["max"], 100 * r["bias"],
                 err["val_loss_coded"][name]]
                for point, p in err["points"].items() for name, r in p["codecs"].items()]
        tables.append((f"(a) error on a trained model's wire tensors (held-out loss uncoded: "
                       f"{err['val_loss_uncoded']:.4f})",
                       ["wire point", "codec", "bytes/elem", "rel. RMS %", "max %", "bias %",
                        "held-out loss, coded"], rows))
    if "training" not in args.skip:
        tr = payload["training"] = training(args, out, args.train_codecs, base)
        title = f"(b) training {args.preset}, {args.steps} steps, codec at {args.where}"
        if args.seeds == 1:
            rows = [[name, get_codec(name).bytes_per_element if get_codec(name) else None, r["val_loss"],
                     r["gap_pct"]] for name, r in tr.items()]
            tables.append((title, ["codec", "bytes/elem", "final held-out loss", "gap to none %"], rows))
        else:
            rows = [[name, get_codec(name).bytes_per_element if get_codec(name) else None, r.get("mean_val_loss"),
                     r.get("gap_pct_mean"), r.get("gap_pct_std"),
                     " ".join(f"{g:+.3f}" for g in r.get("gap_pct_by_seed", {}).values())] for name, r in tr.items()]
            tables.append((f"{title}, seeds {args.seed}..{args.seed + args.seeds - 1} (gaps paired by seed)",
                           ["codec", "bytes/elem", "mean held-out loss", "mean gap %", "std of gap %",
                            "gap per seed %"], rows))
    if "speed" not in args.skip:
        sp = payload["speed"] = speed(tuple(args.speed_shape), args.codecs)
        rows = [[name, r["encode_decode_s"] * 1e3, r["GB_per_s_of_bf16_input"], r["overhead_vs_50GBps_all_to_all"]]
                for name, r in sp["codecs"].items()]
        tables.append((f"(c) encode + decode of {tuple(args.speed_shape)} BF16 on {sp['device']}",
                       ["codec", "ms", "GB/s of BF16 input", "overhead on a 50 GB/s all-to-all (x)"], rows))
    fig = _plot(payload)
    return common.finish(out, NAME, tables, payload, fig)


def _plot(payload):
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    if "error" in payload:
        points = payload["error"]["points"]
        names = list(next(iter(points.values()))["codecs"])
        width = 0.8 / max(1, len(points))
        for i, (point, p) in enumerate(points.items()):
            ax.bar([j + i * width for j in range(len(names))], [100 * p["codecs"][n]["rel_rms"] for n in names],
                   width, label=f"{point} (median tile range 2^{p['tile_range_log2_median']:.1f})")
        ax.set_xticks([j + width * (len(points) - 1) / 2 for j in range(len(names))], names)
        ax.set_yscale("log")
        ax.set_ylabel("relative RMS error (%)")
        ax.set_title("(a) error on a trained model's wire tensors")
        ax.legend(fontsize="small")
    ax = axes[1]
    if payload.get("training"):
        common.plot_val_loss(ax, payload["training"], "none", "(b) training with the codec", "curve")
    for a in axes:
        a.grid(alpha=0.3)
    return fig
