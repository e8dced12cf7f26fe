"""`moeco train` bad inputs: one line on stderr, exit 2, and nothing in OUT touched."""

import hashlib

import pytest

from moeco.cli import main

from test_train_run import small_cfg  # noqa: E402  (pytest puts tests/ on sys.path)


def snapshot(root):
    return {str(p.relative_to(root)): (hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir",
                                       p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def run_cli(argv, capsys):
    code = main(["train", *argv])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    cfg = small_cfg(tmp, "train.steps=2", "checkpoint.every=0")
    (tmp / "c.toml").write_text(cfg.to_toml())
    assert main(["train", "--config", str(tmp / "c.toml"), "--out", str(tmp / "run"), "--quiet"]) == 0
    return tmp


@pytest.mark.parametrize("argv, message", [
    (["--data", "{tmp}/missing.txt"], "data path '{tmp}/missing.txt' does not exist"),
    (["--data", "{tmp}/empty.txt"], "holds no text"),
    (["--set", "data.seq_len=4096"], "data.seq_len = 4096 exceeds the model's max_position_embeddings = 128"),
    (["--set", "train.micro_batch_size=3"], "train.batch_size = 4 does not divide across 1 rank(s) x micro_batch_size 3"),
    (["--set", "train.batch_size=100000"], "fewer than train.batch_size = 100000"),
    (["--set", "model.n_group=3"], "ModelConfig.n_group = 3 is invalid"),
    (["--set", "data.tokenizer='{tmp}/nope'"], "tokenizer '{tmp}/nope' not found"),
    (["--set", "train.cuda_graph=true", "--set", "train.device=cpu"], "train.cuda_graph = true needs a CUDA device, not cpu"),
])
def test_bad_inputs_fail_in_one_line_without_touching_out(tmp_path, capsys, argv, message):
    cfg = small_cfg(tmp_path)
    (tmp_path / "c.toml").write_text(cfg.to_toml())
    (tmp_path / "empty.txt").write_text("\n \n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, err = run_cli(["--config", str(tmp_path / "c.toml"), "--out", str(out), *argv], capsys)
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("moeco train: error: ")
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert snapshot(out) == before


def test_existing_run_is_not_overwritten_and_resume_checks_compatibility(finished_run, capsys):
    run = finished_run / "run"
    before = snapshot(run)
    cases = [
        (["--config", str(finished_run / "c.toml"), "--out", str(run)], "already holds a training run"),
        (["--resume", str(run), "--set", "model.hidden_size=64", "--steps", "4"],
         "has model hidden_size = 48 but this run asks for 64"),
        (["--resume", str(run), "--set", "data.seq_len=16", "--steps", "4"],
         "cannot resume"),
        (["--resume", str(run), "--steps", "1"], "train.steps = 1 is below the checkpoint's step"),
        (["--resume", str(finished_run / "nothing")], "holds no training run"),
        (["--resume", str(run), "--config", "x.toml"], "drop --config"),
    ]
    for argv, message in cases:
        code, err = run_cli(argv, capsys)
        assert code == 2 and "\n" not in err and message in err, (argv, err)
    assert snapshot(run) == before


def test_resume_continues_and_print_config(finished_run, capsys):
    run = finished_run / "run"
    assert main(["train", "--resume", str(run), "--steps", "3", "--quiet"]) == 0
    assert (run / "checkpoints" / "step-00000003").is_dir()
    capsys.readouterr()
    assert main(["train", "--preset", "small", "--set", "lr=1e-4", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert 'preset = "small"' in text and "lr = 0.0001" in text and "[checkpoint]" in text
