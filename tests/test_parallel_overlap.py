"""Dual micro-batch overlap (moeco.parallel.overlap) on 4 gloo processes (2 nodes x 2) and on one."""

from __future__ import annotations

import pytest
import torch

from parallel_helpers import run_ranks


def _same(a, b, exact, what):
    if exact:
        assert torch.equal(a, b), what
    else:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"{what}: {m}")


def test_single_process_schedule_equals_plain_forward():
    """LocalDispatcher (nothing in flight): two micro-batches give the plain forward's loss and grads."""
    from helpers import micro_config
    from overlap_workers import reference

    config = micro_config()
    a, b = reference(config, 4, "none"), reference(config, 4, "two_microbatch")
    _same(b["logits"], a["logits"], False, "logits")
    _same(b["loss"], a["loss"], False, "loss")
    assert set(a["grads"]) == set(b["grads"])
    for n in a["grads"]:
        _same(b["grads"][n], a["grads"][n], False, n)


@pytest.mark.slow
def test_overlap_equals_plain_and_single_process(tmp_path):
    """EP 4 (direct all-to-all): interleaved == the same micro-batches one after the other (bit for bit),
    both == the plain forward and the single-process run (fp32, 1e-5); forward and backward. The event
    order shows A's dispatch issued before B's attention and waited on after it."""
    from helpers import micro_config
    from overlap_workers import ROWS, overlap_step, reference

    config = micro_config()
    W = 4
    res = run_ranks(overlap_step, W, config, 2, out_dir=tmp_path)
    ref = reference(config, ROWS * W)
    L = config.n_routed_experts // W
    for r, out in enumerate(res):
        sl = slice(r * ROWS, (r + 1) * ROWS)
        for mode in ("none", "sequential", "two_microbatch"):
            o = out[mode]
            _same(o["logits"], ref["logits"][sl], False, f"rank {r} {mode} logits")
            _same(o["loss"], ref["loss"], False, f"rank {r} {mode} loss")
            for n, g in o["grads"].items():
                want = ref["grads"][n]
                if ".experts." in n and "shared" not in n:
                    first = o["first"][n.split(".experts.")[0]]
                    want = want[first:first + L]
                _same(g, want, False, f"rank {r} {mode} grad {n}")
        seq, ovl = out["sequential"], out["two_microbatch"]
        _same(ovl["logits"], seq["logits"], True, f"rank {r} interleaved vs sequential logits")
        for n in seq["grads"]:
            _same(ovl["grads"][n], seq["grads"][n], True, f"rank {r} interleaved vs sequential grad {n}")
        order = ovl["order"]
        layer = config.first_k_dense_replace  # the first MoE layer
        issue, attn_b, wait = (order.index(f"A:issue:dispatch:{layer}"), order.index(f"B:compute:attention:{layer}"),
                               order.index(f"A:wait:dispatch:{layer}"))
        assert issue < attn_b < wait, order
        assert order.index(f"A:issue:combine:{layer}") < order.index(f"B:compute:experts:{layer}") \
            < order.index(f"A:wait:combine:{layer}"), order
