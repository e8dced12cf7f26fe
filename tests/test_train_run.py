"""End to end: a short run learns, writes metrics/plots/checkpoints/model, resumes bitwise, balances."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import moeco
from moeco.errors import ConfigError
from moeco.generate import generate
from moeco.train import checkpointing
from moeco.train.config import TrainConfig
from moeco.train.metrics import read_metrics
from moeco.train.trainer import train

# A model small enough that a step takes tens of milliseconds on one core, with every V3 part:
# MLA, a dense first layer, sigmoid routing with bias over 2 groups, a shared expert, MTP.
MODEL = dict(hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=2,
             num_attention_heads=2, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
             v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
             first_k_dense_replace=1, max_position_embeddings=128, vocab_size=384)


def corpus(tmp_path: Path) -> Path:
    from pydoc_data import topics

    path = tmp_path / "corpus.txt"
    if not path.exists():
        names = sorted(topics.topics)[:40]
        path.write_text("\n\n".join(topics.topics[n] for n in names))
    return path


def small_cfg(tmp_path: Path, *extra: str) -> TrainConfig:
    return TrainConfig().with_overrides(small_cfg_sets(tmp_path, *extra))


def small_cfg_sets(tmp_path: Path, *extra: str) -> list[str]:
    sets = [f"model.{k}={v}" for k, v in MODEL.items()] + [
        f'data.path="{corpus(tmp_path)}"', "data.seq_len=32", "train.batch_size=4", "train.steps=8",
        "train.warmup_steps=2", "train.lr=3e-3", "checkpoint.every=4", "log.eval_interval=4", "log.eval_batches=2",
        "checkpoint.keep=3"]
    return sets + list(extra)


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl")]


def test_short_run_learns_and_writes_everything(tmp_path):
    out = tmp_path / "run"
    summary = train(small_cfg(tmp_path, "train.steps=30", "checkpoint.every=10", "log.eval_interval=10"), out,
                    verbose=False)
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 31))
    for key in ("step", "loss", "lm_loss", "mtp_loss", "balance_loss", "lr", "grad_norm", "tokens_per_s",
                "expert_load"):
        assert key in records[-1]
    assert set(records[-1]["expert_load"]) == {"1", "2"}  # the MoE layer and the MTP layer
    assert [r["step"] for r in records if "val_loss" in r] == [10, 20, 30]
    first, last = sum(losses(out)[:3]) / 3, sum(losses(out)[-3:]) / 3
    assert last < first - 0.5, (first, last)
    assert summary["val_loss"] == records[-1]["val_loss"]
    assert (out / "plots" / "loss.png").stat().st_size > 1000
    assert (out / "plots" / "expert_load.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-00000010", "step-00000020", "step-00000030"]

    model = moeco.load_pretrained(out / "model")
    assert model.config.vocab_size == 384 and model.config.num_nextn_predict_layers == 1
    assert (out / "model" / "tokenizer.json").is_file()
    # the routing bias learned by the hook is saved with the model
    _, moe = next(model.moe_layers())
    assert moe.gate.e_score_correction_bias.abs().sum() > 0
    ids = torch.tensor([[5, 6, 7, 8]])
    assert generate(model, ids, max_new_tokens=5).shape == (1, 9)


def test_final_model_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "run"
    train(small_cfg(tmp_path, "train.steps=2", "checkpoint.every=0"), out, verbose=False)
    env_before = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        hf = transformers.AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
        tok = transformers.AutoTokenizer.from_pretrained(out / "model")
    finally:
        if env_before is None:
            del os.environ["HF_HUB_OFFLINE"]
    ours = moeco.load_pretrained(out / "model")
    ids = torch.tensor([tok.encode("The for statement")])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids).logits, atol=1e-4, rtol=1e-4)
    assert tok.decode(ids[0]) == "The for statement"


def test_resume_after_a_crash_is_bitwise_identical(tmp_path):
    cfg = small_cfg(tmp_path, "train.steps=10", "checkpoint.every=4")
    train(cfg, tmp_path / "straight", verbose=False)

    class Crash(Exception):
        pass

    def crash_at_6(step, record):
        if step == 6:
            raise Crash

    with pytest.raises(Crash):
        train(cfg, tmp_path / "crashed", verbose=False, on_step=crash_at_6)
    assert len(read_metrics(tmp_path / "crashed" / "metrics.jsonl")) == 6
    train(cfg, tmp_path / "crashed", resume=True, verbose=False)

    assert losses(tmp_path / "crashed") == losses(tmp_path / "straight")  # bitwise: == on floats
    a = moeco.load_pretrained(tmp_path / "straight" / "model").state_dict()
    b = moeco.load_pretrained(tmp_path / "crashed" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_crash_between_write_and_rename_keeps_the_latest_checkpoint(tmp_path, monkeypatch):
    cfg = small_cfg(tmp_path, "train.steps=8", "checkpoint.every=4")
    real_publish = checkpointing.publish_dir

    def die_on_second(tmp, final):
        if final.name == "step-00000008":
            raise KeyboardInterrupt  # as if killed after the files were written, before the rename
        real_publish(tmp, final)

    monkeypatch.setattr(checkpointing, "publish_dir", die_on_second)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run", verbose=False)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    assert [p.name for p in ckpt_dir.iterdir() if p.name.startswith("step-")] == ["step-00000004"]
    assert any(p.name.startswith(".tmp-") for p in ckpt_dir.iterdir())  # the partial one is invisible
    monkeypatch.setattr(checkpointing, "publish_dir", real_publish)
    train(cfg, tmp_path / "run", resume=True, verbose=False)
    assert not any(p.name.startswith(".tmp-") for p in ckpt_dir.iterdir())
    train(cfg, tmp_path / "straight", verbose=False)
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")


def _complete(ckpt: Path) -> None:
    torch.load(ckpt / "trainer.pt", weights_only=True)
    json.loads((ckpt / "meta.json").read_text())
    moeco.load_pretrained(ckpt / "model")


@pytest.mark.parametrize("delay", [0.05] + [pytest.param(d, marks=pytest.mark.slow) for d in (0.0, 0.1, 0.15, 0.2, 0.3)])
def test_sigkill_never_leaves_a_corrupt_latest(tmp_path, delay):
    """Kill a real `moeco train` with SIGKILL while it checkpoints every step; the latest must load."""
    cfg = small_cfg(tmp_path, "train.steps=400", "checkpoint.every=1", "checkpoint.keep=2")
    (tmp_path / "c.toml").write_text(cfg.to_toml())
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "moeco", "train", "--config", str(tmp_path / "c.toml"), "--out", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(read_metrics(out / "metrics.jsonl")) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(delay)  # land somewhere inside a step or its checkpoint write
    finally:
        proc.kill()
        proc.wait()
    mgr = checkpointing.CheckpointManager(out / "checkpoints", keep=2)
    latest = mgr.latest()
    assert latest is not None and mgr.steps()[-1] >= 2
    _complete(latest)
    resumed = subprocess.run(cmd[:4] + ["--resume", str(out), "--steps", str(mgr.steps()[-1] + 2), "--quiet"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert read_metrics(out / "metrics.jsonl")[-1]["step"] == mgr.steps()[-1]


def test_short_run_with_gamma_ends_better_balanced_than_without(tmp_path):
    """Issue 4: with gamma = 0.001 the max/mean expert load at the end of a short run is lower than with 0.

    16 experts, top-4 in 2 of 4 groups, 240 steps at lr 3e-4: without the bias the routers collapse
    (max/mean 4.0, every token on the same 4 experts); with it the load has recovered by step 240 for
    every seed tried (at 120 steps some seeds are still collapsed: 2.9-3.5 for seeds 0 and 2);
    measured on 2026-12-04, seeds 0 and 2: 1.47 and 1.51 vs 4.0.
    """
    def final_load(gamma):
        cfg = small_cfg(tmp_path, f"train.bias_update_speed={gamma}", "train.steps=240", "train.lr=3e-4",
                        "checkpoint.every=0", "log.eval_interval=0", "model.n_routed_experts=16",
                        "model.num_experts_per_tok=4", "model.n_group=4", "model.topk_group=2")
        out = tmp_path / f"gamma-{gamma}"
        train(cfg, out, overwrite=True, verbose=False)
        loads = [max(r["expert_load"].values()) for r in read_metrics(out / "metrics.jsonl")]
        return sum(loads[-10:]) / 10

    balanced, unbalanced = final_load(0.001), final_load(0.0)
    assert balanced < 0.7 * unbalanced, (balanced, unbalanced)


@pytest.mark.parametrize("precision", ["fp8", "fp8-ue8m0"])
def test_precision_flag_trains_with_the_fp8_recipe(tmp_path, precision):
    from moeco.cli import main
    from moeco.fp8.linear import Fp8Linear

    out = tmp_path / precision
    argv = ["train", "--precision", precision, "--out", str(out), "--quiet"]
    argv += [f"--set={k}" for k in small_cfg_sets(tmp_path, "train.steps=2", "checkpoint.every=0",
                                                   "log.eval_interval=0")]
    assert main(argv) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)  # finite, not NaN
    assert f'precision = "{precision}"' in (out / "train_config.toml").read_text()
    from moeco.train.trainer import _recipe

    recipe = _recipe(precision)
    assert isinstance(recipe.make_linear(128, 128, role="mlp"), Fp8Linear)


def test_trainer_weight_cache_gives_the_same_losses(tmp_path):
    """tiny-sized model, FP8, two micro-steps per optimizer step: with and without the cache the
    run is the same to the bit (the master weights do not change inside a step)."""
    from moeco.train.trainer import Trainer

    runs = []
    for cache in ("true", "false"):
        cfg = small_cfg(
            tmp_path, 'train.precision="fp8"', "train.micro_batch_size=2", "train.steps=3",
            f"train.fp8_weight_cache={cache}", "checkpoint.every=0", "log.eval_interval=0")
        trainer = Trainer(cfg, tmp_path / f"run-{cache}", overwrite=True, verbose=False)
        assert trainer.accum == 2
        runs.append([trainer.train_step()["loss"] for _ in range(3)])
    assert runs[0] == runs[1]


def test_keep_zero_writes_the_model_and_no_checkpoints(tmp_path):
    out = tmp_path / "run"
    summary = train(small_cfg(tmp_path, "train.steps=4", "checkpoint.every=2", "checkpoint.keep=0"), out, verbose=False)
    assert (out / "model" / "config.json").is_file() and summary["steps"] == 4
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="checkpoint.keep"):
        small_cfg(tmp_path, "checkpoint.keep=-1")
