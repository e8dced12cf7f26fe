"""Latent hand-over between a prefill and a decode worker over torch.distributed point-to-point.

Each (prefill, decode) pair gets its own two-rank process group (prefill rank 0, decode rank 1),
created on first use by both sides through a TCPStore that the router hosts, under the key
`pair` = "<prefill id>|<decode id>|<epoch>". Worker ids change when a worker restarts and the router
bumps the epoch after a failed transfer, so a broken group is never reused and a restarted worker
simply meets its peer under a new key. One request's hand-over is three tagged messages:

    tag + 0   int64 [first token, draft token or -1]
    tag + 1   uint8 sampler state (seeded requests only; its size is the same on both sides)
    tag + 2   uint8 latent rows: (pool layers, tokens sent, latent_dim) in the cache dtype, as bytes

Bytes, because gloo rejects FP8 tensors; the receiver views them back as the pool's dtype. The
decode side posts its receives as soon as it has told the router its reservation, so they are
waiting before the prefill even starts. Every blocking call runs on a thread of its own pool (a
receive can wait for a whole prefill queue) and fails after `timeout_s`; a dead peer fails it at
once. A side whose call fails forgets the group; the router then moves the pair to a new epoch.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import torch
import torch.distributed as dist


class Transfer:
    def __init__(self, timeout_s: float, backend: str = "gloo"):
        self.timeout = timedelta(seconds=timeout_s)
        self.backend = backend
        self.stores: dict[str, dist.TCPStore] = {}
        self.groups: dict[str, dist.ProcessGroup] = {}
        self.locks: dict[str, threading.Lock] = {}
        self.lock = threading.Lock()
        self.pool = ThreadPoolExecutor(max_workers=512, thread_name_prefix="moeco-transfer")

    def _group(self, store_addr: str, pair: str, rank: int):
        with self.lock:
            lock = self.locks.setdefault(pair, threading.Lock())
        with lock:  # one rendezvous per pair, whichever request gets here first
            if pair not in self.groups:
                with self.lock:
                    if store_addr not in self.stores:
                        host, port = store_addr.rsplit(":", 1)
                        self.stores[store_addr] = dist.TCPStore(host, int(port), is_master=False,
                                                                timeout=self.timeout)
                    store = self.stores[store_addr]
                prefixed = dist.PrefixStore(f"moeco-pair/{pair}", store)
                if self.backend == "nccl":  # untested here (no two GPUs): each worker on its own GPU
                    self.groups[pair] = dist.ProcessGroupNCCL(prefixed, rank, 2)
                else:
                    self.groups[pair] = dist.ProcessGroupGloo(prefixed, rank, 2, self.timeout)
            return self.groups[pair]

    def drop(self, pair: str) -> None:
        with self.lock:
            self.groups.pop(pair, None)

    def send(self, store_addr: str, pair: str, tag: int, state: dict, rows: torch.Tensor) -> None:
        """Prefill side (rank 0): blocks until every message is handed to the transport."""
        dev = rows.device if self.backend == "nccl" else "cpu"  # NCCL moves device tensors only
        try:
            g = self._group(store_addr, pair, 0)
            header = torch.tensor([state["first_token"], state["draft"]], dtype=torch.int64, device=dev)
            g.send([header], 1, tag).wait()
            if state.get("generator") is not None:
                g.send([state["generator"].to(dev)], 1, tag + 1).wait()
            if rows.numel():
                g.send([rows.to(dev)], 1, tag + 2).wait()
        except Exception:
            self.drop(pair)
            raise

    def recv(self, store_addr: str, pair: str, tag: int, state_bytes: int | None, row_bytes: int,
             device="cpu") -> tuple[dict, torch.Tensor]:
        """Decode side (rank 1): (state, rows as uint8, on `device` with NCCL, else on the CPU)."""
        dev = device if self.backend == "nccl" else "cpu"
        try:
            g = self._group(store_addr, pair, 1)
            header = torch.empty(2, dtype=torch.int64, device=dev)
            g.recv([header], 0, tag).wait()
            gen = None
            if state_bytes is not None:
                gen = torch.empty(state_bytes, dtype=torch.uint8, device=dev)
                g.recv([gen], 0, tag + 1).wait()
                gen = gen.cpu()  # generator states live on the host
            rows = torch.empty(row_bytes, dtype=torch.uint8, device=dev)
            if row_bytes:
                g.recv([rows], 0, tag + 2).wait()
        except Exception:
            self.drop(pair)
            raise
        first, draft = header.tolist()
        return {"first_token": first, "draft": draft, "generator": gen}, rows
