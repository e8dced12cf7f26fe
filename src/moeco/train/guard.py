"""Stop a run whose loss is no longer a number, before it publishes a NaN model.

A step whose loss or gradient norm is NaN or infinite almost always writes NaN into the weights
(AdamW's moments take the NaN, and so does every later update). So while the latest step was not
finite no checkpoint is written, the weights are checked before any checkpoint or model is, and
after `train.max_nonfinite_steps` such steps in a row the run stops with a one-line `TrainingError`:
the newest checkpoint stays the last good one and the final model is not written.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from moeco.errors import TrainingError

_FIX = "lower train.lr, raise train.warmup_steps or set train.grad_clip, then resume"


class NonFiniteGuard:
    def __init__(self, limit: int, latest: Callable[[], Path | None]) -> None:
        self.limit, self.latest = limit, latest
        self.run: list[int] = []  # steps of the current streak of non-finite steps

    @property
    def ok(self) -> bool:
        return not self.run

    def update(self, record: dict) -> None:
        """After each step's record is logged: count it, and stop at the limit."""
        if math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"]):
            self.run = []
            return
        self.run.append(record["step"])
        if len(self.run) >= self.limit:
            raise TrainingError(self._stopped(f"the loss was {record['loss']} (gradient norm {record['grad_norm']}) "
                                              f"for {len(self.run)} step(s) in a row, from step {self.run[0]}"))

    def before_publishing(self) -> None:
        """At the end of the run: a streak still going means the weights are not worth writing."""
        if self.run:
            raise TrainingError(self._stopped(f"the loss was not finite for the last {len(self.run)} step(s), from "
                                              f"step {self.run[0]}"))

    def check_weights(self, model: torch.nn.Module, step: int) -> None:
        """Before a checkpoint or the model is written: refuse NaN/inf weights."""
        named = list(model.named_parameters())
        with torch.no_grad():
            finite = torch.stack([torch.isfinite(p).all() for _, p in named]).cpu()  # one host sync
        if not bool(finite.all()):
            bad = named[int((~finite).nonzero()[0])][0]
            raise TrainingError(self._stopped(f"weight {bad!r} holds NaN or infinite values at step {step}"))

    def _stopped(self, what: str) -> str:
        latest = self.latest()
        kept = (f"the latest good checkpoint is {str(latest)!r}" if latest is not None
                else "no checkpoint was written")
        return f"training stopped: {what}; no model was written and {kept}; {_FIX}"
