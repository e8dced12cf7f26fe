"""Checkpoints that survive a crash at any moment.

Layout of a run directory (OUT):

    OUT/checkpoints/step-00000200/   model/ (HF layout: config.json, *.safetensors, tokenizer.json)
                                     trainer.pt (optimizer, step, loader, RNG), meta.json
    OUT/checkpoints/.tmp-...         a checkpoint being written (or left by a crash; ignored, removed)

Writing one: everything goes into a fresh `.tmp-*` directory, every file and the directory are
fsync'ed, then one `rename` makes it `step-N` and the parent directory is fsync'ed. A rename is
atomic on POSIX file systems, so a reader (and `--resume`) sees either the whole checkpoint or none
of it, whenever the writer is killed; only then are checkpoints beyond the newest `keep` removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from moeco.fsutil import fsync_tree, publish_dir

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

    def save(self, step: int, write_model: Callable[[Path], None], trainer_state: dict) -> Path:
        """write_model(dir) writes the HF-layout model (and tokenizer) into dir."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-step-{step:08d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        write_model(tmp / "model")
        torch.save(trainer_state, tmp / "trainer.pt")
        meta = {"step": step, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / "meta.json").write_text(json.dumps(meta) + "\n")
        fsync_tree(tmp)
        publish_dir(tmp, self.path(step))
        for old in self.steps()[:-self.keep]:
            shutil.rmtree(self.path(old), ignore_errors=True)
        return self.path(step)

    @staticmethod
    def load_trainer_state(path: Path) -> dict:
        return torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
