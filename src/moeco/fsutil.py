"""Crash-safe directory writes: fill a temporary directory, fsync it, publish it with one rename.

A rename is atomic on POSIX file systems, so a reader sees the old directory or the complete new
one, whenever the writer dies; the fsyncs make sure the renamed directory's contents are on disk.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file under `path`, then every directory bottom-up."""
    dirs = []
    for root, _, filenames in os.walk(path):
        dirs.append(root)
        for name in filenames:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
    for d in reversed(dirs):
        fsync_dir(Path(d))


def publish_dir(tmp: Path, final: Path) -> None:
    """Make the complete, fsync'ed `tmp` appear as `final`, replacing an older `final` if any."""
    old = None
    if final.exists():
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
