"""What every `moeco experiment` shares: options, training runs, the trained model, and the outputs.

Each experiment writes into `--out` (default runs/experiments/NAME):

    NAME.json   every number in the table plus the settings and the machine
    NAME.png    the plot
    runs/       the training runs it made (moeco train run directories)

and prints its table. Training runs use `moeco train`'s trainer with the options below; `--set`
passes any training option through (e.g. `--set model.hidden_size=256`). Experiments that read a
trained model take `--run DIR`, a `moeco train` run directory (`make run` writes runs/tiny); without
it they first train one into runs/base next to `--out` (runs/experiments/runs/base by default), shared by
the experiments and reused while the training options are the same.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from moeco.errors import ConfigError


def add_common_args(p: argparse.ArgumentParser, *, steps: int, batch_size: int = 8, seq_len: int = 64) -> None:
    p.add_argument("--out", metavar="DIR", help="output directory (default runs/experiments/NAME)")
    p.add_argument("--preset", default="tiny", help="model preset of the training runs (default tiny)")
    p.add_argument("--steps", type=int, default=steps, help=f"optimizer steps per training run (default {steps})")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"sequences per step (default {batch_size})")
    p.add_argument("--seq-len", type=int, default=seq_len, help=f"tokens per sequence (default {seq_len})")
    p.add_argument("--data", metavar="PATH", help="training text (default: the embedded corpus)")
    p.add_argument("--seed", type=int, default=0, help="seed of the training runs (default 0)")
    p.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                   help="any training option for every run, as in `moeco train --set` (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress lines from the training runs")


def add_seeds_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seeds", type=int, default=1,
                   help="training runs per variant, with seeds SEED, SEED+1, ...; above 1 the table gives each "
                        "variant's gap to the reference run of the same seed as a mean and spread (default 1)")


def seed_args(args) -> list[argparse.Namespace]:
    """One copy of args per seed of `--seeds` (SEED, SEED+1, ...), each with its own `seed`."""
    check_positive(args, "seeds")
    return [argparse.Namespace(**{**vars(args), "seed": args.seed + i}) for i in range(args.seeds)]


def run_name(name: str, args, first_seed: int) -> str:
    """A training run's directory name: NAME for the first seed, NAME-seedS for the others."""
    return name if args.seed == first_seed else f"{name}-seed{args.seed}"


def paired_gaps(losses: dict[str, dict[int, float]], ref: str) -> dict[str, dict]:
    """losses[variant][seed] = final held-out loss -> per variant: the mean loss, and the gap in % to the
    `ref` run of the same seed, per seed, with its mean and sample standard deviation."""
    import statistics

    out = {}
    for name, by_seed in losses.items():
        gaps = {s: 100 * (v - losses[ref][s]) / losses[ref][s] for s, v in by_seed.items()}
        g = list(gaps.values())
        out[name] = {"mean_val_loss": statistics.fmean(by_seed.values()), "gap_pct_by_seed": gaps,
                     "gap_pct_mean": statistics.fmean(g), "gap_pct_std": statistics.stdev(g) if len(g) > 1 else None}
    return out


def add_run_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", metavar="DIR", help="a `moeco train` run directory to measure (default: train one "
                                                "into OUT/runs/base)")


def out_dir(args, name: str) -> Path:
    out = Path(args.out or f"runs/experiments/{name}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def check_positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is None or value < 1:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} = {value!r} is invalid: must be at least 1")


# ---- training runs ---------------------------------------------------------------------------
def train_sets(args, *extra: str) -> list[str]:
    """The `--set` list of a training run: the experiment's defaults, then --set, then the run's own."""
    steps = args.steps
    sets = [f'model.preset="{args.preset}"', f"train.steps={steps}", f"train.batch_size={args.batch_size}",
            f"data.seq_len={args.seq_len}", f"train.seed={args.seed}", "train.lr=2e-3",
            f"train.warmup_steps={max(1, steps // 10)}", "train.bias_update_speed=0.01",
            f"log.eval_interval={max(1, steps // 5)}", "log.eval_batches=4", "checkpoint.every=0", "checkpoint.keep=0",
            f"log.interval={max(1, steps // 5)}"]
    if args.data:
        sets.append('data.path="' + args.data.replace("\\", "\\\\").replace('"', '\\"') + '"')
    return sets + list(args.assignments) + list(extra)


def train_run(args, out: Path, name: str, *extra: str, tokenizer: Path | None = None) -> dict:
    """Train one run into OUT/runs/NAME (replacing it); returns the summary plus its metric records."""
    from moeco.train.config import TrainConfig
    from moeco.train.metrics import read_metrics
    from moeco.train.trainer import train

    sets = train_sets(args, *extra)
    if tokenizer is not None and (tokenizer / "tokenizer.json").is_file():
        sets.append(f'data.tokenizer="{tokenizer / "tokenizer.json"}"')  # the same vocabulary, no BPE retraining
    cfg = TrainConfig().with_overrides(sets)
    run_dir = out / "runs" / name
    if not args.quiet:
        print(f"-- training run {name}: {' '.join(extra) or 'defaults'}")
    summary = train(cfg, run_dir, overwrite=True, verbose=not args.quiet)
    return {**summary, "records": read_metrics(run_dir / "metrics.jsonl"), "dir": str(run_dir)}


def base_run(args, out: Path) -> Path:
    """`--run`, else the shared base run next to OUT (OUT/../base), trained now unless it already holds a
    finished run made with the same training options."""
    if getattr(args, "run", None):
        run = Path(args.run)
        if not (run / "model" / "config.json").is_file() or not (run / "data" / "tokens.json").is_file():
            raise ConfigError(f"--run {str(run)!r} is not a finished `moeco train` run directory (needs model/ and "
                              f"data/); pass the --out of a `moeco train` run, e.g. runs/tiny after `make run`")
        return run
    home = out.parent
    run = home / "runs" / "base"
    stamp = run / "experiment_sets.json"
    sets = train_sets(args)
    if not (run / "model" / "config.json").is_file() or not stamp.is_file() or json.loads(stamp.read_text()) != sets:
        train_run(args, home, "base")
        stamp.write_text(json.dumps(sets))
    return run


def planned_model_config(args):
    """The ModelConfig of `--run`, or of the base run `base_run` would train (checked before any work)."""
    from moeco.config import ModelConfig
    from moeco.train.config import TrainConfig

    if getattr(args, "run", None) and (Path(args.run) / "model" / "config.json").is_file():
        return ModelConfig.from_hf(Path(args.run) / "model" / "config.json")
    return TrainConfig().with_overrides(train_sets(args)).model_config()


@dataclass
class TrainedRun:
    model: torch.nn.Module
    val_BS: torch.Tensor  # (n, seq_len + 1) held-out token ids
    path: Path


def load_run(run: Path, max_val: int = 64) -> TrainedRun:
    """The run's final model (float32, eval mode) and its held-out sequences, both on the GPU when there
    is one (a `small` model's held-out forward is minutes on a CPU)."""
    from moeco import load_pretrained
    from moeco.train.config import TrainConfig
    from moeco.train.data import PackedData, load_stream

    cfg = TrainConfig.from_toml(run / "train_config.toml")
    stream, _ = load_stream(run / "data")
    data = PackedData.build(stream, cfg.seq_len, cfg.val_fraction)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretrained(run / "model", dtype=torch.float32, device=device).eval()
    return TrainedRun(model, data.sequences(data.val_index[:max_val]).to(device), run)


@torch.no_grad()
def val_loss(model, val_BS: torch.Tensor, batch: int = 8) -> float:
    import torch.nn.functional as F

    total, count = 0.0, 0
    for i in range(0, len(val_BS), batch):
        seqs = val_BS[i:i + batch]
        logits = model(seqs[:, :-1]).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), seqs[:, 1:].flatten(), reduction="sum").item()
        count += seqs[:, 1:].numel()
    return total / count


# ---- outputs ---------------------------------------------------------------------------------
def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, {platform.machine()})"


def write_json(out: Path, name: str, payload: dict) -> Path:
    path = out / f"{name}.json"
    meta = {"experiment": name, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "hardware": machine(), "torch": torch.__version__}
    path.write_text(json.dumps({**meta, **payload}, indent=2, default=float) + "\n")
    return path


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c != columns[0] else "left")
    for row in rows:
        table.add_row(*[_fmt(v) for v in row])
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)  # a log file: no wrapping at 80 columns
    console.print(table)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.3g}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_val_loss(ax, results: dict, ref: str, title: str, curve: str) -> None:
    """The held-out loss of a training comparison: with one seed each run's curve (results[name][curve]:
    (step, loss) pairs); with several, bars of each run's mean gap to `ref` (`paired_gaps`) with its
    standard deviation, a dot per seed."""
    if len(next(iter(results.values()))["val_loss_by_seed"]) == 1:
        for name, r in results.items():
            ax.plot(*zip(*r[curve]), "o-", label=f"{name}: {r['val_loss']:.4f}", linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out loss (nats)")
        ax.set_title(title)
        ax.legend(fontsize="small")
        return
    for i, r in enumerate(results.values()):
        gaps = list(r["gap_pct_by_seed"].values())
        ax.bar(i, r["gap_pct_mean"], 0.6, yerr=r["gap_pct_std"], capsize=4, color="lightsteelblue",
               edgecolor="steelblue")
        ax.plot([i] * len(gaps), gaps, "o", color="black", markersize=3)
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xticks(range(len(results)), list(results), fontsize="small")
    ax.set_ylabel(f"final held-out loss gap to {ref}, same seed (%)")
    ax.set_title(f"{title}: mean ± std of {len(gaps)} seeds (dots)")


def finish(out: Path, name: str, tables: list[tuple[str, list[str], list[list]]], payload: dict, fig) -> dict:
    """Print the tables (title, columns, rows), write NAME.json and NAME.png; returns paths and payload."""
    for title, columns, rows in tables:
        print_table(title, columns, rows)
    js = write_json(out, name, {"tables": [{"title": t, "columns": c, "rows": r} for t, c, r in tables], **payload})
    png = out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    pyplot().close(fig)
    print(f"written: {js}, {png}")
    return {"json": str(js), "png": str(png), "tables": tables, **payload}
