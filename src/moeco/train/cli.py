"""`moeco train`: train a DeepSeek-V3-style model, or continue a run with `--resume OUT`.

    moeco train --preset tiny --out runs/tiny --steps 300
    moeco train --config train.toml --set train.lr=3e-4 --set model.hidden_size=256
    moeco train --resume runs/tiny --steps 600
    torchrun --nproc-per-node 2 -m moeco train --preset tiny --out runs/tiny-dp
    moeco train --print-config > train.toml        # every option, with a comment each

Precedence: defaults < --config file < --preset/--data/--steps/... flags < --set KEY=VALUE.
"""

from __future__ import annotations

import argparse
import sys

from moeco.train.config import PRECISIONS, TrainConfig

DEFAULT_OUT = "runs/train"
# Training defaults a preset brings (below a --config file's values and any flag or --set): `tiny`
# trains 300 steps on 2 CPU cores, where 1e-3 with 100 warmup steps is still far from converged.
PRESET_TRAINING = {"tiny": {"lr": 2e-3, "warmup_steps": 30}}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model (embedded corpus by default); --resume OUT continues a run",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE.toml", help="a TOML config (see --print-config)")
    p.add_argument("--preset", help="model preset (tiny, small, deepseek-v2-lite, ...); default tiny")
    p.add_argument("--data", metavar="PATH", help="text file, folder, or JSONL with 'text'; default: embedded corpus")
    p.add_argument("--out", metavar="DIR", help=f"run directory (default {DEFAULT_OUT})")
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--seed", type=int, help="seed for weights and data order")
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="checkpoint every N steps (0: end only)")
    p.add_argument("--precision", choices=PRECISIONS,
                   help="auto (bf16 autocast on GPUs, fp32 on CPU) | fp32 | bf16 | fp8 (DeepSeek-V3's recipe) "
                        "| fp8-ue8m0 (power-of-two scales)")
    p.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                   help="override any option, e.g. train.lr=3e-4 or model.hidden_size=256 (repeatable)")
    p.add_argument("--resume", metavar="OUT", help="continue the run in OUT from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start over in an --out that already holds a run")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.set_defaults(func=run)


def flag_assignments(args) -> list[str]:
    """The explicit flags as --set assignments (so they apply on top of a config file or a resumed run)."""
    out = []
    if args.preset is not None:
        out.append(f'model.preset="{args.preset}"')
    if args.data is not None:
        out.append(f"data.path={_quote(args.data)}")
    if args.steps is not None:
        out.append(f"train.steps={args.steps}")
    if args.seed is not None:
        out.append(f"train.seed={args.seed}")
    if args.checkpoint_every is not None:
        out.append(f"checkpoint.every={args.checkpoint_every}")
    if args.precision is not None:
        out.append(f'train.precision="{args.precision}"')
    return out + list(args.assignments)


def _explicit_options(config_file: str | None, assignments: list[str]) -> set[str]:
    """TrainConfig field names the user set, in the --config file or with a flag or --set."""
    from moeco.train.config import _resolve, tomllib

    keys = [item.partition("=")[0].strip() for item in assignments]
    if config_file and tomllib is not None:
        with open(config_file, "rb") as f:
            keys += [f"{table}.{key}" for table, values in tomllib.load(f).items() for key in values]
    return {name for name, is_model in map(_resolve, keys) if not is_model}


def with_model_fields(toml: str, cfg: TrainConfig, model) -> str:
    """The TOML with the preset's model fields listed as comments in [model], so they can be seen and edited."""
    import dataclasses

    from moeco.train.config import _toml_value

    lines = [f"# {f.name} = {_toml_value(getattr(model, f.name))}" for f in dataclasses.fields(model)
             if f.name != "extra" and f.name not in cfg.model_overrides]
    head = f"# the {cfg.preset!r} preset's values (uncomment a line to change it):"
    before, sep, after = toml.partition("[data]")
    return before.rstrip("\n") + "\n" + "\n".join([head, *lines]) + "\n\n" + sep + after if sep else toml


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def run(args) -> int:
    from moeco.errors import ConfigError
    from moeco.train.run_dir import resume_config

    assignments = flag_assignments(args)
    if args.resume:
        if args.out and args.out != args.resume:
            raise ConfigError(f"--resume {args.resume} continues that directory; drop --out {args.out}")
        if args.config:
            raise ConfigError("--resume reads the run's own train_config.toml; drop --config "
                              "(use --set to change an option such as train.steps)")
        cfg, out = resume_config(args.resume, assignments), args.resume
    else:
        base = TrainConfig.from_toml(args.config) if args.config else TrainConfig()
        cfg, out = base.with_overrides(assignments), args.out or DEFAULT_OUT
        given = _explicit_options(args.config, assignments)
        cfg = cfg.replace(**{k: v for k, v in PRESET_TRAINING.get(cfg.preset, {}).items() if k not in given})
    model = cfg.model_config()  # a bad model option fails here, before any work
    if args.print_config:
        sys.stdout.write(with_model_fields(cfg.to_toml(), cfg, model))
        return 0

    from moeco.train.trainer import train

    train(cfg, out, resume=bool(args.resume), overwrite=args.overwrite, verbose=not args.quiet)
    return 0
