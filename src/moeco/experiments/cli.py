"""`moeco experiment NAME`: reproduce one of DeepSeek-V3's claims at small scale.

    moeco experiment accumulation            # FP8 GEMM error vs K
    moeco experiment logfmt                  # wire codecs: error on real tensors, training, speed
    moeco experiment balance                 # aux-loss-free vs aux loss vs neither
    moeco experiment node-limit              # node-limited routing: traffic and quality
    moeco experiment mtp                     # MTP draft acceptance on held-out text
    moeco experiment NAME --help             # its options

Each writes NAME.json and NAME.png into --out (default runs/experiments/NAME) and prints a table.
Those that need a trained model take --run DIR (a `moeco train` run) or train a small one first.
docs/paper.md has the figures each one produced, with the paper's statement beside them.
"""

from __future__ import annotations

import argparse
import importlib

from moeco.errors import ConfigError
from moeco.experiments import EXPERIMENTS


def register(subparsers) -> None:
    # The experiment modules import torch; they are imported only when one runs, so that
    # `moeco plan` and the others start without it.
    p = subparsers.add_parser("experiment", help="reproduce a claim of the DeepSeek-V3 papers at small scale",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", metavar="NAME", help=" | ".join(EXPERIMENTS))
    p.add_argument("options", nargs=argparse.REMAINDER, help="the experiment's options (NAME --help lists them)")
    p.set_defaults(func=run)


def parser_for(name: str) -> argparse.ArgumentParser:
    if name not in EXPERIMENTS:
        raise ConfigError(f"experiment {name!r} does not exist; choose one of {', '.join(EXPERIMENTS)}")
    module = importlib.import_module(EXPERIMENTS[name])
    q = argparse.ArgumentParser(prog=f"moeco experiment {name}", description=module.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_args(q)
    q.set_defaults(func=module.run)
    return q


def run(args) -> int:
    inner = parser_for(args.name).parse_args(args.options)
    inner.func(inner)
    return 0
