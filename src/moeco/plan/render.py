"""Output helpers shared by the planner's commands: rich tables, one JSON object, plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moeco.errors import ConfigError


def _console():
    from rich.console import Console

    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 120, highlight=False)


def _table(title: str, columns: list[str], rows: list[list], caption: str | None = None, left: int = 1):
    from rich.table import Table

    t = Table(title=title, caption=caption, caption_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i < left or i == len(columns) - 1 and c in ("note", "source")
                     else "right", overflow="fold")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    return t


def _emit(args, obj: dict, *renderables) -> int:
    if args.json:
        sys.stdout.write(json.dumps(obj) + "\n")
    else:
        console = _console()
        for r in renderables:
            console.print(r)
    return 0


def _b(n: float) -> str:
    """A parameter count: billions (B), millions (M) below a billion, else the number itself."""
    if n >= 1e9:
        return f"{n / 1e9:,.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:,.2f} M"
    return f"{n:,.0f}"


def _g(x: float) -> str:
    """GFLOP: two decimals, or three significant digits below 1 (a small model is not 0.00)."""
    g = x / 1e9
    return f"{g:,.2f}" if g >= 1 or g == 0 else f"{g:.3g}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str, args) -> None:
    target = Path(path)
    if not target.parent.exists():
        raise ConfigError(f"--plot {path!r}: folder {str(target.parent)!r} does not exist")
    if target.is_dir():
        raise ConfigError(f"--plot {path!r} is a folder; pass a file name such as {str(target / 'plot.png')!r}")
    kinds = fig.canvas.get_supported_filetypes()
    suffix = target.suffix.lstrip(".").lower()
    if not suffix:  # matplotlib writes PNG and adds the suffix itself
        target = target.with_name(target.name + ".png")
    elif suffix not in kinds:
        raise ConfigError(f"--plot {path!r}: .{suffix} is not an image format matplotlib writes; end the name "
                          f"with one of .{', .'.join(sorted(kinds))}")
    fig.tight_layout()
    try:
        fig.savefig(target, dpi=120)
    except OSError as exc:
        raise ConfigError(f"--plot {path!r} cannot be written ({exc.strerror}); choose a path you can write to") \
            from None
    print(f"wrote {target}", file=sys.stderr if args.json else sys.stdout)


