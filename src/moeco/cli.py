"""The `moeco` command line: `moeco plan | train | generate | demo | ...`.

Each subpackage registers its own subcommand with `register(subparsers)`; the parser's
`func` receives the parsed namespace. Errors a user can cause (`MoecoError`) print one line
and exit 2; anything else keeps its traceback because it is a bug.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from moeco.errors import MoecoError

# module path -> provides register(subparsers); a missing optional module is skipped.
_SUBCOMMANDS = (
    "moeco.bench_cli",
    "moeco.generate_cli",
    "moeco.plan.cli",
    "moeco.serve.cli",
    "moeco.train.cli",
    "moeco.experiments.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moeco",
        description="Train, serve and plan DeepSeek-V3-style Mixture-of-Experts models.",
    )
    from moeco import __version__

    parser.add_argument("--version", action="version", version=f"moeco {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _SUBCOMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # the subcommand is not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MoecoError as exc:
        print(f"moeco {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {exc.filename!r}" if exc.filename else ""
        print(f"moeco {args.command}: error: no space left on the device{where}; free some space and run "
              f"again", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moeco {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
