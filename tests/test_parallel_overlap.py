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


def _between(order, first, middle, last) -> bool:
    return order.index(first) < order.index(middle) < order.index(last)


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


def test_one_microbatch_is_the_plain_forward_timed():
    """micro_batches=1 (bench/overlap.py's `none`): the plain forward's logits and gradients, with spans."""
    from helpers import micro_config
    from overlap_workers import batch, build_model, reference, step_loss

    from moeco.parallel.overlap import set_overlap

    config = micro_config()
    a = reference(config, 4, "none")
    model = build_model(config)
    sched = set_overlap(model, "two_microbatch")
    sched.micro_batches = 1
    out, loss = step_loss(model, batch(config, B=4))
    loss.backward()
    _same(out.logits.detach(), a["logits"], True, "logits")
    for n, p in model.named_parameters():
        if p.grad is not None:
            _same(p.grad, a["grads"][n], False, n)
    assert {mb for mb, *_ in sched.last.spans()} == {0} and sched.last.stats().compute_s > 0


def test_overlap_equals_plain_and_single_process(tmp_path):
    """EP 4, direct and two-hop: interleaved (forward and backward, or forward only) == the same
    micro-batches one after the other (bit for bit), all == the plain forward and the single-process run
    (fp32, 1e-5); forward and backward. The event order shows A's dispatch issued before B's attention
    and waited on after it, in the forward, and mirrored in the backward."""
    from helpers import micro_config
    from overlap_workers import MODES, ROWS, overlap_step, reference

    config = micro_config()
    W = 4
    res = run_ranks(overlap_step, W, config, 2, out_dir=tmp_path)
    ref = reference(config, ROWS * W)
    L = config.n_routed_experts // W
    for d in ("direct", "two_hop"):
        for r, out in enumerate(res):
            sl = slice(r * ROWS, (r + 1) * ROWS)
            for mode in MODES:
                o = out[d, mode]
                _same(o["logits"], ref["logits"][sl], False, f"{d} rank {r} {mode} logits")
                _same(o["loss"], ref["loss"], False, f"{d} rank {r} {mode} loss")
                for n, g in o["grads"].items():
                    want = ref["grads"][n]
                    if ".experts." in n and "shared" not in n:
                        first = o["first"][n.split(".experts.")[0]]
                        want = want[first:first + L]
                    _same(g, want, False, f"{d} rank {r} {mode} grad {n}")
            seq = out[d, "sequential"]
            for mode in ("two_microbatch", "forward_only"):
                ovl = out[d, mode]
                _same(ovl["logits"], seq["logits"], True, f"{d} rank {r} {mode} vs sequential logits")
                assert set(ovl["grads"]) == set(seq["grads"])
                for n in seq["grads"]:
                    _same(ovl["grads"][n], seq["grads"][n], True, f"{d} rank {r} {mode} vs sequential grad {n}")
            order = out[d, "two_microbatch"]["order"]
            i = config.first_k_dense_replace  # the first MoE layer
            assert _between(order, f"A:issue:dispatch:{i}", f"B:compute:attention:{i}", f"A:wait:dispatch:{i}"), order
            assert _between(order, f"A:issue:combine:{i}", f"B:compute:experts:{i}", f"A:wait:combine:{i}"), order


def test_backward_overlaps_like_the_forward(tmp_path):
    """EP 4 (2 nodes x 2), direct and two-hop: in the backward each gradient all-to-all is posted where the
    forward waited and waited on where the forward issued, so A's combine gradient is issued before B's
    experts' backward and waited on after it, A's dispatch gradient around B's attention backward, B's
    around A's; with `overlap_backward=False` (each gradient sent and received at once) none of it holds."""
    from helpers import micro_config
    from overlap_workers import overlap_step

    config = micro_config()
    res = run_ranks(overlap_step, 4, config, 2, ("direct", "two_hop"), ("two_microbatch", "forward_only"),
                    out_dir=tmp_path)
    i = config.first_k_dense_replace  # the first MoE layer; the next one ends the model (i + 1 < layers)
    pairs = [(f"A:issue:combine:{i}", f"B:compute:experts:{i}", f"A:wait:combine:{i}"),
             (f"B:issue:dispatch:{i}", f"A:compute:experts:{i}", f"B:wait:dispatch:{i}"),
             (f"A:issue:dispatch:{i}", f"B:compute:attention:{i}", f"A:wait:dispatch:{i}"),
             (f"B:issue:combine:{i}", f"A:compute:attention:{i + 1}", f"B:wait:combine:{i}")]
    for d in ("direct", "two_hop"):
        for r, out in enumerate(res):
            overlapped, at_once = out[d, "two_microbatch"]["order_backward"], out[d, "forward_only"]["order_backward"]
            for first, middle, last in pairs:
                assert _between(overlapped, first, middle, last), (d, r, first, middle, last, overlapped)
                assert not _between(at_once, first, middle, last), (d, r, first, middle, last, at_once)


@pytest.mark.slow
def test_trainer_overlap_equals_single_process(tmp_path):
    """`moeco train --set parallel.ep=4 --set parallel.overlap=two_microbatch` (2 nodes x 2, two sequences a
    rank): the losses of 2 steps equal the single-process run's; the step records the overlap spans, forward and
    backward."""
    import random

    from ep_workers import train_run
    from moeco.train.config import TrainConfig
    from moeco.train.trainer import train
    from test_parallel_train import OVERRIDES

    rng = random.Random(0)
    words = "the for statement module import class def return value python list dict".split()
    path = tmp_path / "text.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(400)))
    base = [f"data.path=\"{path}\""] + OVERRIDES + ["train.batch_size=8", "train.steps=2", "model.vocab_size=512",
                                                    "parallel.dispatcher=\"direct\""]
    ref = {}
    train(TrainConfig().with_overrides(base), tmp_path / "single", verbose=False,
          on_step=lambda s, rec: ref.__setitem__(s, rec["loss"]))
    res = run_ranks(train_run, 4, base + ["parallel.ep=4", "parallel.overlap=\"two_microbatch\""], tmp_path / "ep",
                    out_dir=tmp_path / "r")
    for step in (1, 2):
        assert res[0]["losses"][step][0] == pytest.approx(ref[step], rel=1e-5, abs=1e-6)
    import json

    rec = json.loads((tmp_path / "ep" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec.get("overlap_wall_s", 0) > 0 and rec["overlap_compute_s"] > 0, rec
    assert rec["overlap_bwd_wall_s"] > 0 and rec["overlap_bwd_in_flight_s"] > 0, rec


def test_overlap_setting_is_validated():
    from moeco.errors import ConfigError
    from moeco.train.config import TrainConfig

    assert TrainConfig().overlap == "none"
    assert TrainConfig().with_overrides(['parallel.overlap="two_microbatch"']).overlap == "two_microbatch"
    with pytest.raises(ConfigError, match="overlap"):
        TrainConfig().with_overrides(['parallel.overlap="dualpipe"'])
