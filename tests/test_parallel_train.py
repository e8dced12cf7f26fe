"""EP training through moeco's trainer on 4 gloo processes: losses, sharded checkpoints, resume under EP 2."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from ep_workers import train_run
from parallel_helpers import run_ranks

OVERRIDES = ["model.vocab_size=256", "model.hidden_size=64", "model.num_hidden_layers=2",
             "model.n_routed_experts=8", "model.num_experts_per_tok=3", "model.n_group=4", "model.topk_group=2",
             "model.moe_intermediate_size=32", "model.intermediate_size=128", "model.num_attention_heads=2",
             "data.seq_len=16", "train.batch_size=4", "train.warmup_steps=1", "train.precision=\"fp32\"",
             "train.lr=1e-3", "log.eval_interval=0", "log.eval_batches=1", "checkpoint.every=2",
             "parallel.gpus_per_node=2", "parallel.timeout_s=60"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(0)
    words = "the for statement module import class def return value python list dict".split()
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(400)))
    return [f"data.path=\"{path}\""]


@pytest.mark.slow
def test_ep_training_checkpoint_and_resume(tmp_path, corpus):
    from moeco import load_pretrained
    from moeco.train.config import TrainConfig
    from moeco.train.trainer import train

    base = corpus + OVERRIDES
    # the single-process reference, 4 steps
    ref = {}
    train(TrainConfig().with_overrides(base + ["train.steps=4"]), tmp_path / "single", verbose=False,
          on_step=lambda s, rec: ref.__setitem__(s, rec["loss"]))
    # EP 4 (2 nodes x 2), 2 steps: a checkpoint at step 2
    run = tmp_path / "ep4"
    res = run_ranks(train_run, 4, base + ["train.steps=2", "parallel.ep=4"], run, out_dir=tmp_path / "r1")
    for step in (1, 2):
        assert res[0]["losses"][step][0] == pytest.approx(ref[step], rel=1e-5, abs=1e-6)
        assert res[0]["losses"][step][1] > 0  # bytes crossed between the two nodes
    # the directory is the HF layout: one process loads it whole, same as the rank-local pieces
    model_dir = run / "model"
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 5  # replicated + one file per EP rank
    whole = load_pretrained(model_dir)
    part = load_pretrained(model_dir, ep_rank=1, ep_size=4)
    for (i, m_whole), (_, m_part) in zip(whole.moe_layers(), part.moe_layers()):
        assert m_part.experts.first_expert == 2 and m_part.experts.w13_E2FD.shape[0] == 2
        assert torch.equal(m_part.experts.w13_E2FD, m_whole.experts.w13_E2FD[2:4])
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = whole(ids).logits
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        AutoModelForCausalLM = None
    if AutoModelForCausalLM is not None:
        hf = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()
        with torch.no_grad():
            torch.testing.assert_close(hf(ids).logits, logits, rtol=1e-4, atol=1e-4)
    # resume to step 4 under EP 4 and under EP 2 (two EP groups of 2 ranks): the same losses as one process
    other = tmp_path / "ep2"
    shutil.copytree(run, other)
    more = base + ["train.steps=4"]
    r4 = run_ranks(train_run, 4, more + ["parallel.ep=4"], run, True, out_dir=tmp_path / "r2")
    r2 = run_ranks(train_run, 4, more + ["parallel.ep=2"], other, True, out_dir=tmp_path / "r3")
    for step in (3, 4):
        assert r4[0]["losses"][step][0] == pytest.approx(ref[step], rel=1e-5, abs=1e-6)
        assert r2[0]["losses"][step][0] == pytest.approx(r4[0]["losses"][step][0], rel=1e-5, abs=1e-6)
