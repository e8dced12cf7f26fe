"""Measured all-to-all bandwidth of a process group: the link figure `moeco.plan.speed.ep_step` takes.

Each of the n members sends an equal share of an `nbytes` buffer to every member (`all_to_all_single`:
gloo on CPU, NCCL on GPU). Bytes to oneself cross no link, so, as the dispatchers' byte counters count
them and as nccl-tests reports an all-to-all's bus bandwidth:

    sent  = nbytes x (n - 1) / n                       bytes this rank sends to the others
    time  = median over `iters` calls (after `warmup`) of the slowest member's time
            (each call: barrier, all_to_all_single, CUDA sync)
    GB/s  = sent / time / 1e9

Measured at the payload size a step sends per collective, the figure carries the collective's fixed
cost (latency, launch) as the step does. On one host (gloo over loopback) "intra-node" and
"inter-node" groups are both memory copies by the same cores; on GPUs the intra-node group measures
NVLink and the inter-node group (one rank per node) IB/RoCE.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist


def all_to_all_gbs(group, nbytes: int, iters: int = 5, warmup: int = 1,
                   device: torch.device | str = "cpu") -> dict:
    """Every member of `group` calls this together; returns the group's bandwidth (the same on every member).

    The members may pass different `nbytes` (a step's payload differs by rank): the largest is used."""
    n = dist.get_world_size(group)
    agreed = torch.tensor([nbytes], dtype=torch.int64, device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
    numel = max(n, int(agreed.item()) // 4 // n * n)  # float32, an equal share per member
    x = torch.ones(numel, dtype=torch.float32, device=device)
    out = torch.empty_like(x)
    cuda = torch.device(device).type == "cuda"
    times = []
    for i in range(warmup + iters):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        dist.all_to_all_single(out, x, group=group)
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    seconds = statistics.median(slowest.tolist())
    sent = numel * 4 * (n - 1) / n
    return {"members": n, "bytes": numel * 4, "sent_bytes": sent, "seconds": seconds,
            "gbs": sent / seconds / 1e9 if n > 1 else None}
