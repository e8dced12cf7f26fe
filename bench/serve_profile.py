"""Where a serving decode step's time goes: the paged kernel's tile sizes swept at V3 shapes, and a
profile of the engine's batch-1 and batch-64 decode steps (host time per step, GPU time by kernel).

    PYTHONPATH=src python bench/serve_profile.py
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import gpu_ms  # noqa: E402


def sweep():
    from moeco.serve.kernels import paged_mla_decode

    rows = []
    for B, ctx in ((64, 4096), (1, 4096)):
        H, C, R, page = 128, 512, 64, 64
        nb = ctx // page
        pool = torch.randn((B * nb + 1) * page, C + R, device="cuda", dtype=torch.bfloat16)
        tables = torch.randperm(B * nb, device="cuda").view(B, nb)
        pos = torch.full((B, 1), ctx - 1, device="cuda")
        ql = torch.randn(B, 1, H, C, device="cuda", dtype=torch.bfloat16)
        qr = torch.randn(B, 1, H, R, device="cuda", dtype=torch.bfloat16)
        nbytes = B * ctx * (C + R) * 2
        best = None
        for bh, bn, w, st, sp in itertools.product((16, 32, 64), (16, 32), (4, 8), (1, 2), (None, 4)):
            try:
                fn = lambda: paged_mla_decode(ql, qr, pool, tables, pos, 0.07, page, num_splits=sp, block_h=bh,  # noqa
                                              block_n=bn, num_warps=w, num_stages=st)
                fn()
                ms = gpu_ms(fn, reps=10)
            except Exception as exc:  # out of resources etc.
                continue
            if best is None or ms < best[0]:
                best = (ms, dict(block_h=bh, block_n=bn, num_warps=w, num_stages=st, num_splits=sp))
        rows.append((B, ctx, best[0], nbytes / best[0] / 1e6, best[1]))
        print(f"B={B} ctx={ctx}: best {best[0]:.3f} ms = {nbytes / best[0] / 1e6:.0f} GB/s with {best[1]}", flush=True)
    return rows


def profile_engine():
    from torch.profiler import ProfilerActivity, profile

    from moeco.config import ModelConfig
    from moeco.model.transformer import Transformer
    from moeco.serve.engine import EngineConfig, LLMEngine
    from moeco.serve.sampling_params import SamplingParams

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(ModelConfig.preset("small")).to(torch.bfloat16).eval()
    for batch in (1, 64):
        engine = LLMEngine(EngineConfig(max_num_seqs=batch, max_model_len=1024, gpu_memory_utilization=0.4), model=model)
        for i in range(batch):
            engine.add_request(torch.randint(0, 30000, (128,)).tolist(), SamplingParams(max_tokens=400, ignore_eos=True))
        for _ in range(20):
            engine.step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            engine.step()
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t) * 20
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                engine.step()
            torch.cuda.synchronize()
        events = prof.key_averages()
        gpu_total = sum(e.self_device_time_total for e in events) / 10 / 1e3
        print(f"\nbatch {batch}: engine step {step_ms:.3f} ms wall, GPU busy {gpu_total:.3f} ms per step", flush=True)
        print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
        print(events.table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60))
        del engine


if __name__ == "__main__":
    sweep()
    profile_engine()
