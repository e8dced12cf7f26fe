"""Run a function on W gloo processes (CPU), as torchrun would lay them out; results come back by file."""

from __future__ import annotations

import os
import socket
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, local_world, port, fn, args, out_dir, timeout_s):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank % local_world),
                       "LOCAL_WORLD_SIZE": str(local_world), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    import torch.distributed as dist

    result = None
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        result = {"ok": fn(rank, *args)}
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        result = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
    finally:
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_ranks(fn, world: int, *args, out_dir, local_world: int | None = None, timeout_s: float = 60,
              join_s: float = 120, raise_errors: bool = True) -> list:
    """fn(rank, *args) on `world` processes; returns each rank's return value (or {'error': ...})."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("fork")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, local_world or world, port, fn, args, str(out_dir),
                                              timeout_s)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(join_s)
    for p in procs:
        if p.is_alive():
            p.kill()
    results = []
    for r in range(world):
        f = Path(out_dir) / f"rank{r}.pt"
        results.append(torch.load(f, weights_only=False) if f.exists() else {"error": "no result (process died)"})
    if raise_errors:
        for r, res in enumerate(results):
            if "error" in res:
                raise AssertionError(f"rank {r}: {res['error']}\n{res.get('trace', '')}")
        return [res["ok"] for res in results]
    return results
