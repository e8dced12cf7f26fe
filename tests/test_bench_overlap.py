"""bench/overlap.py's planner comparison: its arithmetic on hand-made measurements, the measured
all-to-all bandwidth it feeds the planner, and a smoke run."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from parallel_helpers import run_ranks

ROOT = Path(__file__).resolve().parents[1]
BENCH = runpy.run_path(str(ROOT / "bench" / "overlap.py"))


def _entry(step_ms, issue_ms, wait_ms, in_flight_ms, intra_gbs, inter_gbs):
    half = lambda ms: ms / 2 / 1e3  # noqa: E731 - split evenly between forward and backward
    stats = {"comm_issue_s": half(issue_ms), "comm_wait_s": half(wait_ms), "in_flight_s": half(in_flight_ms),
             "compute_s": 0.0, "wall_s": 0.0}
    return {"rank_step_s": step_ms / 1e3, "forward": stats, "backward": stats, "skew_s": 0.002,
            "bytes": {"dispatch_intra": 1e6, "combine_intra": 1e6, "dispatch_inter": 2e6, "combine_inter": 2e6,
                      "dispatch_self": 5e5},
            "intra_gbs": intra_gbs, "inter_gbs": inter_gbs, "ep_gbs": 1.5, "payload_bytes": 1000}


def test_prediction_from_measured_inputs():
    """compute = step - blocked = 100 - 20 = 80 ms; bytes a step = 2 x forward (the gradients go back):
    4 MB at 1 GB/s + 8 MB at 2 GB/s = 8 ms; f = 30 / (30 + 20) = 0.6 -> exposed 3.2 ms, step 83.2 ms."""
    r = BENCH["predict"]([_entry(100, 15, 5, 30, 1.0, 2.0), _entry(100, 15, 5, 30, 1.0, 2.0)])
    assert (r["intra_bytes"], r["inter_bytes"]) == (4e6, 8e6)
    assert r["compute_ms"] == pytest.approx(80) and r["comm_ms"] == pytest.approx(8)
    assert r["overlap"] == pytest.approx(0.6) and r["step_ms"] == pytest.approx(83.2)
    assert r["ratio"] == pytest.approx(0.832) and r["measured_blocked_ms"] == pytest.approx(20)
    assert (r["step_ms_no_overlap"], r["step_ms_full_overlap"]) == pytest.approx((88, 80))
    assert r["skew_ms"] == pytest.approx(2)


def _bandwidth(rank):
    import torch.distributed as dist

    from moeco.parallel.bandwidth import all_to_all_gbs

    return all_to_all_gbs(dist.group.WORLD, 40_000 + 1000 * rank, iters=2)  # the ranks' payloads differ


def test_all_to_all_bandwidth(tmp_path):
    """Two gloo ranks: both measure the largest payload, half of it sent to the other rank, at one figure."""
    a, b = run_ranks(_bandwidth, 2, out_dir=tmp_path)
    assert a == b and a["members"] == 2 and a["bytes"] == 41_000 and a["sent_bytes"] == 20_500
    assert a["gbs"] == pytest.approx(a["sent_bytes"] / a["seconds"] / 1e9) and a["gbs"] > 0


def test_bench_runs_and_compares(tmp_path):
    """4 gloo ranks, a tiny model, one step a schedule: the planner's figures come out for all three."""
    out = tmp_path / "overlap.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    subprocess.run([sys.executable, str(ROOT / "bench" / "overlap.py"), "--steps", "1", "--rounds", "1", "--seqs", "2",
                    "--seq-len", "16", "--dim", "64", "--layers", "2", "--bw-iters", "2", "--png", "",
                    "--json", str(out)], check=True, env=env, capture_output=True, timeout=300)
    planner = json.loads(out.read_text())["planner"]
    assert set(planner) == {"none", "forward_only", "two_microbatch"}
    for r in planner.values():
        assert 0 <= r["overlap"] <= 1 and r["comm_ms"] > 0 and r["inter_bytes"] > 0 and r["ratio"] > 0
        assert r["step_ms_full_overlap"] <= r["step_ms"] <= r["step_ms_no_overlap"]
