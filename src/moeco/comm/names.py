"""Codec names, checked without importing torch (the training config validates them)."""

from __future__ import annotations

import re

from moeco.errors import ConfigError

NAMES = ("bf16", "e4m3", "e5m2", "logfmt8", "logfmt10", "logfmtN (N = 3..16)", "none")


def parse_codec_name(name: str | None, field: str = "codec") -> tuple[str, int | None]:
    """("none" | "bf16" | "e4m3" | "e5m2" | "logfmt", bits or None); a bad name raises a one-line ConfigError."""
    key = (name or "none").strip().lower().replace("-", "").replace("_", "") if isinstance(name, (str, type(None))) \
        else None
    if key in ("none", ""):
        return "none", None
    if key in ("bf16", "e4m3", "e5m2"):
        return key, None
    m = re.fullmatch(r"logfmt(\d+)", key or "")
    if m and 3 <= int(m.group(1)) <= 16:
        return "logfmt", int(m.group(1))
    raise ConfigError(f"{field} = {name!r} is invalid: choose one of {', '.join(NAMES)}")
