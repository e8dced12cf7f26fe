"""GPU time of a callable without the host: CUDA-graph replay with the L2 flushed before every call.

`gpu_ms(fn)` captures `reps` x (read a 256 MB buffer, fn()) in one CUDA graph, and the same number of
flushes alone in another; the difference over reps is fn's GPU time with a cold L2 and no Python or
launch cost (the cost `train.cuda_graph` removes in training). The flush reads (a reduction) rather
than writes: zeroing a buffer, as triton's do_bench does, leaves the L2 full of dirty lines that the
timed kernel then pays to write back (up to ~15 us, a third of a 4096-token quantization). `host_ms(fn)` is triton's do_bench:
what an eager caller sees, host overhead included when the kernels are shorter than their launches.
"""

from __future__ import annotations

import torch

_FLUSH: torch.Tensor | None = None


def host_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _replay_ms(graph: torch.cuda.CUDAGraph, n: int = 9) -> float:
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def capture(fn, reps: int = 1) -> torch.cuda.CUDAGraph:
    """fn() x reps recorded in one CUDA graph, after 3 warm-up calls on a side stream (allocations,
    autotuning and lazy probes happen there, outside the capture)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    return graph


def gpu_ms(fn, reps: int = 20) -> float:
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.ones(128 * 1024 * 1024, dtype=torch.bfloat16, device="cuda")
    g_all = capture(lambda: (_FLUSH.amax(), fn()), reps)
    g_flush = capture(_FLUSH.amax, reps)
    g_all.replay()
    g_flush.replay()
    torch.cuda.synchronize()
    return max(_replay_ms(g_all) - _replay_ms(g_flush), 1e-6) / reps
