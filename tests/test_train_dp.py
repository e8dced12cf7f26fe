"""Data parallelism: `torchrun --nproc-per-node 2 -m moeco train` (gloo) matches one process."""

import os
import subprocess
import sys

import pytest

from moeco.train.metrics import read_metrics

from test_train_run import small_cfg  # noqa: E402  (pytest puts tests/ on sys.path)


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


@pytest.mark.slow  # over 10 s on 2 cores: CI runs it in .ci/run's second pass
@pytest.mark.parametrize("micro", [0, 1])  # 0: one micro-step per rank; 1: two accumulated micro-steps
def test_two_process_gloo_equals_one_process(tmp_path, micro):
    cfg = small_cfg(tmp_path, "train.steps=6", "checkpoint.every=3", "log.eval_interval=3",
                    f"train.micro_batch_size={micro}")
    (tmp_path / "c.toml").write_text(cfg.to_toml())
    base = [sys.executable, "-m", "moeco", "train", "--config", str(tmp_path / "c.toml"), "--quiet"]
    single = cfg.with_overrides(["train.micro_batch_size=0"])  # one process, the whole global batch at once
    (tmp_path / "single.toml").write_text(single.to_toml())
    _run([sys.executable, "-m", "moeco", "train", "--config", str(tmp_path / "single.toml"), "--quiet",
          "--out", str(tmp_path / "one")], tmp_path)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
         + base[1:] + ["--out", str(tmp_path / "two")], tmp_path)
    one, two = read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=2e-4, abs=1e-5), (a["step"], key)
        assert b["expert_load"] == pytest.approx(a["expert_load"], rel=1e-6)  # counts summed over ranks
    assert two[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=2e-4)
    assert (tmp_path / "two" / "model" / "config.json").is_file()


def test_batch_that_does_not_divide_across_ranks_is_one_line(tmp_path):
    cfg = small_cfg(tmp_path, "train.batch_size=3")
    (tmp_path / "c.toml").write_text(cfg.to_toml())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "moeco", "train", "--config", str(tmp_path / "c.toml"), "--out",
                           str(tmp_path / "o")], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "error: train.batch_size = 3 does not divide across 2 rank(s); use a multiple of 2" in done.stderr
    assert not (tmp_path / "o").exists()
