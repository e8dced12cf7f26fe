"""Checkpoints that survive a crash at any moment.

Layout of a run directory (OUT):

    OUT/checkpoints/step-00000200/   model/ (HF layout: config.json, *.safetensors, tokenizer.json)
                                     trainer.pt (optimizer, step, loader, RNG), meta.json
    OUT/checkpoints/.tmp-...         a checkpoint being written (or left by a crash; ignored, removed)

Writing one: everything goes into a fresh `.tmp-*` directory, every file and the directory are
fsync'ed, then one `rename` makes it `step-N` and the parent directory is fsync'ed. A rename is
atomic on POSIX file systems, so a reader (and `--resume`) sees either the whole checkpoint or none
of it, whenever the writer is killed; only then are checkpoints beyond the newest `keep` removed.

A checkpoint damaged afterwards (a truncated file, a bad disk) is caught by `problem`: resume falls
back to the newest complete one and moves the damaged ones aside as `.corrupt-step-N`. A write that
runs out of space removes its `.tmp-*` directory and raises a one-line `StorageError` naming the path
and the space needed; the checkpoints already published stay as they were.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
import zipfile
from pathlib import Path
from typing import Callable

import torch

from moeco.errors import StorageError
from moeco.fsutil import fsync_tree, publish_dir
from moeco.resources import human_bytes

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

_STEP_DIR = re.compile(r"^step-(\d{8})$")


class CheckpointManager:
    def __init__(self, root: Path, keep: int) -> None:
        self.root, self.keep = Path(root), keep

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = (_STEP_DIR.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:08d}"

    def latest(self) -> Path | None:
        steps = self.steps()
        return self.path(steps[-1]) if steps else None

    def remove_partial(self) -> None:
        """Delete directories a crashed writer left behind."""
        if self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith((".tmp-", ".old-")):
                    shutil.rmtree(p, ignore_errors=True)

    def problem(self, path: Path) -> str | None:
        """Why the checkpoint at `path` cannot be resumed from (a missing, truncated or unreadable file),
        or None. Reads every file's header and the trainer state's checksums, not the tensor values."""
        from safetensors import safe_open

        try:
            meta = json.loads((path / "meta.json").read_text())
            if not isinstance(meta, dict) or meta.get("step") != int(path.name.split("-")[1]):
                return "meta.json does not name this step"
            with zipfile.ZipFile(path / "trainer.pt") as z:
                bad = z.testzip()
            if bad is not None:
                return f"trainer.pt is damaged ({bad})"
            config = json.loads((path / "model" / "config.json").read_text())
            if not isinstance(config, dict):
                return "model/config.json is not a JSON object"
            index = path / "model" / "model.safetensors.index.json"
            files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
                     else ["model.safetensors"])
            for name in files:
                with safe_open(str(path / "model" / name), framework="pt"):
                    pass
        except Exception as exc:  # any unreadable part makes the checkpoint unusable
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'}"
        return None

    def save(self, step: int, write_model: Callable[[Path], None], trainer_state: dict) -> Path:
        """write_model(dir) writes the HF-layout model (and tokenizer) into dir."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-step-{step:08d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            write_model(tmp / "model")
            torch.save(trainer_state, tmp / "trainer.pt")
            meta = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
            fsync_tree(tmp)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
                raise self._no_space(step, exc, trainer_state) from None
            raise
        publish_dir(tmp, self.path(step))
        for old in self.steps()[:-self.keep]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return self.path(step)

    def _no_space(self, step: int, exc: OSError, trainer_state: dict) -> StorageError:
        latest = self.latest()
        if latest is not None:
            needed = sum(p.stat().st_size for p in latest.rglob("*") if p.is_file())
        else:  # the optimizer state is about two thirds of a checkpoint (two moments per weight)
            needed = int(1.5 * _tensor_bytes(trainer_state))
        free = shutil.disk_usage(self.root).free
        where = exc.filename or str(self.root)
        kept = f"the latest checkpoint {latest.name} is intact" if latest else "no checkpoint was written"
        return StorageError(f"no space left on the device writing {str(where)!r} (checkpoint step {step}): it needs "
                            f"about {human_bytes(needed)}, {human_bytes(free)} is free; free some space or lower "
                            f"checkpoint.keep, then resume ({kept})")

    @staticmethod
    def load_trainer_state(path: Path) -> dict:
        return torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0
