"""Rank bookkeeping from torchrun's environment: rank, world size, device, the default process group.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; a plain `python` run is rank 0 of 1
and creates no process group. The backend follows the device: NCCL on CUDA, gloo on CPU. `timeout_s`
bounds every collective, so a rank that dies makes the others fail with an error instead of waiting
forever (gloo raises when a peer's socket closes or the timeout passes).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from moeco.errors import ConfigError


class Dist:
    """rank / world / device from torchrun's environment; a no-op for a single process."""

    def __init__(self, device_opt: str = "auto", timeout_s: float = 600.0) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        self.timeout_s = timeout_s
        want_cuda = device_opt.startswith("cuda") or (device_opt == "auto" and torch.cuda.is_available())
        if want_cuda and not torch.cuda.is_available():
            raise ConfigError(f"train.device = {device_opt!r} but no CUDA device is visible; use cpu or auto")
        if want_cuda:
            index = int(device_opt.split(":")[1]) if ":" in device_opt else self.local_rank
            self.device = torch.device("cuda", index)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.owns_group = False
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=timedelta(seconds=timeout_s))
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world
        return values

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            values = values.clone()
            dist.all_reduce(values)
        return values

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    def leave(self) -> None:
        """The normal end of a multi-rank run (`leave`, when this object started the group)."""
        if self.owns_group and dist.is_initialized():
            leave()


def leave(group=None) -> None:
    """The normal end of a multi-rank run, on every rank: wait for all of `group` (default: the world),
    then destroy every process group. A process that exits with its gloo groups alive can abort in
    their destructors ("terminate called without an active exception") while a peer tears down."""
    dist.barrier(group=group)
    dist.destroy_process_group()


def agree(fn, world: int):
    """fn() on every rank; if it raised a MoecoError on any, every rank raises it (one line, naming the rank).

    For steps that can fail on some ranks only (each reads its own experts from a checkpoint), so that
    the others do not wait in the next collective until the timeout.
    """
    from moeco.errors import MoecoError

    result, failure = None, None
    try:
        result = fn()
    except MoecoError as exc:
        failure = exc
    if world > 1:
        outcomes = [None] * world
        dist.all_gather_object(outcomes, None if failure is None else (type(failure).__name__, str(failure)))
        bad = [(r, o) for r, o in enumerate(outcomes) if o is not None]
        if bad and failure is None:
            from moeco.errors import ConfigError, LoadError

            r, (kind, msg) = bad[0]
            raise {"LoadError": LoadError}.get(kind, ConfigError)(f"rank {r}: {msg}")
    if failure is not None:
        raise failure
    return result
