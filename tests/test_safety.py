"""Data safety, bad input and defaults (issue 18, parts 4 and 5): each case a user hit, with what it gets now."""

import errno
import json
import logging
import math
import os
import stat

import pytest
import torch
from safetensors.torch import load_file, save_file

import moeco
from helpers import micro_config
from moeco import ConfigError, ModelConfig
from moeco.cli import main
from moeco.errors import DataError, LoadError, StorageError, TrainingError
from moeco.train import checkpointing
from moeco.train.config import TrainConfig
from moeco.train.corpus import load_documents
from moeco.train.trainer import Trainer, train

from test_train_cli import snapshot  # pytest puts tests/ on sys.path
from test_train_run import small_cfg


# ---- --set values ---------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [("False", False), ("TRUE", True), ("false", False), ("true", True)])
def test_set_booleans_are_parsed_strictly(text, want):
    cfg = TrainConfig().with_overrides([f"model.norm_topk_prob={text}", f"train.compile={text}"])
    assert cfg.model_config().norm_topk_prob is want and cfg.compile is want


@pytest.mark.parametrize("item", ["model.norm_topk_prob=maybe", "train.compile=maybe", "model.seq_aux=1"])
def test_set_boolean_that_is_not_one_is_a_one_line_error(item):
    with pytest.raises(ConfigError, match=r"is invalid: (expected|must be) true or false") as info:
        TrainConfig().with_overrides([item]).model_config()
    assert "\n" not in str(info.value)


def test_negative_initializer_range_is_refused():
    with pytest.raises(ConfigError, match=r"initializer_range = -0.1 is invalid"):
        ModelConfig.preset("tiny").replace(initializer_range=-0.1)


# ---- data -----------------------------------------------------------------------------------
def test_json_file_of_jsonl_records_is_read_as_records(tmp_path):
    lines = [json.dumps({"text": "first"}), json.dumps({"text": "second"})]
    for name in ("data.json", "data.txt"):
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        assert load_documents(str(tmp_path / name))[0] == ["first", "second"]
    (tmp_path / "list.json").write_text(json.dumps([{"text": "a"}, {"text": "b"}], indent=1))
    assert load_documents(str(tmp_path / "list.json"))[0] == ["a", "b"]
    (tmp_path / "other.json").write_text(json.dumps({"config": 1}, indent=1))
    with pytest.raises(DataError, match="not a list of records with a string 'text' field"):
        load_documents(str(tmp_path / "other.json"))
    (tmp_path / "prose.txt").write_text("{ not json } but prose\n")
    assert load_documents(str(tmp_path / "prose.txt"))[0] == ["{ not json } but prose\n"]


# ---- the run directory ----------------------------------------------------------------------


def quick(tmp_path, *extra):
    return small_cfg(tmp_path, "train.steps=2", "checkpoint.every=0", "log.eval_interval=0", *extra)


def test_overwrite_removes_only_what_moeco_wrote(tmp_path):
    out = tmp_path / "run"
    train(quick(tmp_path), out, verbose=False)
    (out / "data" / "corpus.txt").write_text("the user's own corpus")
    (out / "notes.txt").write_text("mine")
    (out / "model" / "README.md").write_text("model card")
    (out / "plots" / "mine.png").write_bytes(b"png")
    train(quick(tmp_path, "train.steps=3"), out, overwrite=True, verbose=False)
    assert (out / "data" / "corpus.txt").read_text() == "the user's own corpus"
    assert (out / "notes.txt").read_text() == "mine" and (out / "plots" / "mine.png").is_file()
    assert (out / "model" / "README.md").read_text() == "model card"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003"]
    assert (out / "data" / "tokens.bin").is_file() and (out / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_moeco_did_not_make_is_refused_not_cleaned(tmp_path, overwrite):
    out = tmp_path / "project"
    (out / "data").mkdir(parents=True)
    (out / "data" / "corpus.txt").write_text("text")
    (out / "model").mkdir()
    before = snapshot(out)
    with pytest.raises(ConfigError, match=r"holds model/, data/ that moeco train did not write") as info:
        train(quick(tmp_path), out, overwrite=overwrite, verbose=False)
    assert "\n" not in str(info.value) and snapshot(out) == before


def test_second_trainer_on_one_out_gets_the_holders_pid(tmp_path):
    out = tmp_path / "run"
    first = Trainer(quick(tmp_path), out, verbose=False)
    try:
        with pytest.raises(ConfigError, match=rf"is in use by another moeco train \(pid {os.getpid()},"):
            Trainer(quick(tmp_path), out, overwrite=True, verbose=False)
        first.run()
        with pytest.raises(ConfigError, match=r"in use by another moeco train"):
            Trainer(quick(tmp_path, "train.steps=4"), out, resume=True, verbose=False)
    finally:
        first.close()
    train(quick(tmp_path, "train.steps=3"), out, overwrite=True, verbose=False)  # free again


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    out = tmp_path / "run"
    cfg = small_cfg(tmp_path, "train.steps=8", "checkpoint.every=4", "log.eval_interval=0")
    train(cfg, out, verbose=False)
    weights = out / "checkpoints" / "step-00000008" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    with caplog.at_level(logging.WARNING):
        train(cfg.replace(steps=9), out, resume=True, verbose=False)
    assert "step-00000008' is damaged" in caplog.text and "resuming from the previous complete one, step-00000004" \
        in caplog.text
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [".corrupt-step-00000008", "step-00000004", "step-00000008", "step-00000009"][-len(names):]
    assert checkpointing.CheckpointManager(out / "checkpoints", 3).problem(out / "checkpoints" / "step-00000009") \
        is None


@pytest.mark.parametrize("writer", ["trainer.pt", "model.safetensors"])
def test_disk_full_is_one_line_and_keeps_the_latest(tmp_path, monkeypatch, writer):
    from safetensors import SafetensorError

    from moeco import checkpoint

    out = tmp_path / "run"
    cfg = small_cfg(tmp_path, "train.steps=8", "checkpoint.every=4", "log.eval_interval=0")
    real_save, real_save_file = torch.save, checkpoint.save_file

    def full_at_8(obj, path, *a, **k):
        if "step-00000008" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *a, **k)

    def safetensors_full_at_8(tensors, path, *a, **k):
        if "step-00000008" in str(path):
            raise SafetensorError(f'Error while serializing: I/O error: No space left on device (os error 28) at '
                                  f'path "{path}"')
        return real_save_file(tensors, path, *a, **k)

    if writer == "trainer.pt":
        monkeypatch.setattr(checkpointing.torch, "save", full_at_8)
    else:
        monkeypatch.setattr(checkpoint, "save_file", safetensors_full_at_8)
    with pytest.raises(StorageError, match=rf"no space left on the device writing '.*{writer}' \(checkpoint step 8\)"
                                           r": it needs about .*B, .*B is free.*step-00000004 is intact") as info:
        train(cfg, out, verbose=False)
    assert "\n" not in str(info.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000004"]
    assert checkpointing.CheckpointManager(out / "checkpoints", 2).problem(out / "checkpoints" / "step-00000004") \
        is None


@pytest.mark.parametrize("limit, stops_at", [(1, 6), (3, 8)])
def test_nan_loss_stops_without_publishing_and_keeps_the_last_good_checkpoint(tmp_path, limit, stops_at):
    out = tmp_path / "run"
    cfg = small_cfg(tmp_path, "train.steps=10", "checkpoint.every=2", "log.eval_interval=0",
                    f"train.max_nonfinite_steps={limit}")
    trainer = Trainer(cfg, out, verbose=False)

    def poison(step, record):
        if step == 5:
            with torch.no_grad():
                trainer.model.lm_head.weight[0, 0] = math.nan

    trainer.on_step = poison
    try:
        with pytest.raises(TrainingError, match=rf"the loss was nan .* from step 6; no model was written and the "
                                                rf"latest good checkpoint is '.*step-00000004'") as info:
            trainer.run()
    finally:
        trainer.close()
    assert "\n" not in str(info.value) and f"for {limit} step(s)" in str(info.value)
    assert trainer.step == stops_at
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert not (out / "model").exists()


def test_nan_weights_are_never_checkpointed(tmp_path):
    trainer = Trainer(quick(tmp_path), tmp_path / "run", verbose=False)
    try:
        with torch.no_grad():
            next(trainer.model.parameters())[0] = math.inf
        with pytest.raises(TrainingError, match=r"weight 'model.embed_tokens.weight' holds NaN or infinite"):
            trainer.save_checkpoint()
    finally:
        trainer.close()


def test_too_small_vocab_is_refused_and_a_changed_vocab_is_said(tmp_path, caplog):
    with pytest.raises(ConfigError, match=r"model.vocab_size = 10 is too small .* at least 258"):
        train(quick(tmp_path, "model.vocab_size=10"), tmp_path / "a", verbose=False)
    assert not (tmp_path / "a").exists()
    with caplog.at_level(logging.WARNING):
        train(quick(tmp_path, "model.vocab_size=20000"), tmp_path / "b", verbose=False)
    assert "model.vocab_size = 20000 became" in caplog.text


def test_out_that_cannot_be_written_fails_before_tokenizing(tmp_path, capsys, monkeypatch):
    from moeco.train import run_dir

    monkeypatch.setattr(run_dir, "_read_and_tokenize", lambda cfg: pytest.fail("tokenized before checking --out"))
    (tmp_path / "file.txt").write_text("x")
    cfg = quick(tmp_path)
    (tmp_path / "c.toml").write_text(cfg.to_toml())
    assert main(["train", "--config", str(tmp_path / "c.toml"), "--out", str(tmp_path / "file.txt" / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot be created: " in err and "file.txt' is a file, not a folder" in err


def test_model_too_large_for_memory_is_refused_before_allocating(tmp_path, capsys):
    assert main(["train", "--preset", "deepseek-v3", "--out", str(tmp_path / "big")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "model.preset = 'deepseek-v3'" in err and " TB but cpu has only" in err
    assert not (tmp_path / "big").exists()


# ---- checkpoints in and out -----------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(3)
    model = moeco.Transformer(micro_config()).eval()
    path = tmp_path_factory.mktemp("ck") / "model"
    model.save_pretrained(path)
    return model, path


def test_save_pretrained_replaces_only_its_own_files_and_writes_0644(saved, tmp_path):
    model, _ = saved
    target = tmp_path / "model"
    model.save_pretrained(target, max_shard_bytes=200_000)
    assert len(list(target.glob("model-*.safetensors"))) > 1
    for name, text in (("tokenizer.json", "{}"), ("README.md", "card"), ("generation_config.json", "{}")):
        (target / name).write_text(text)
    (target / "assets").mkdir()
    (target / "assets" / "logo.txt").write_text("logo")
    model.save_pretrained(target)
    names = sorted(p.name for p in target.iterdir())
    assert names == ["README.md", "assets", "config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json"]  # the old shards and index went, the user's files stayed
    assert (target / "README.md").read_text() == "card" and (target / "assets" / "logo.txt").read_text() == "logo"
    assert stat.S_IMODE((target / "model.safetensors").stat().st_mode) == 0o666 & ~_umask()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary left behind
    moeco.load_pretrained(target)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _copy_with(src, dst, change):
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_nan_or_integer_tensor_in_a_checkpoint_is_refused_by_name(saved, tmp_path):
    _, path = saved
    name = "model.layers.0.self_attn.o_proj.weight"

    def nan(t):
        t[name][0, 0] = math.nan

    def integer(t):
        t[name] = t[name].to(torch.int32)

    with pytest.raises(LoadError, match=rf"tensor '{name}' holds 1 NaN or infinite value\(s\)"):
        moeco.load_pretrained(_copy_with(path, tmp_path / "nan", nan))
    with pytest.raises(LoadError, match=rf"tensor '{name}' is stored as torch.int32, a floating-point tensor"):
        moeco.load_pretrained(_copy_with(path, tmp_path / "int", integer))


@pytest.mark.parametrize("text", ["[1, 2]", '"config"', "3"])
def test_config_json_that_is_not_an_object_is_one_line(saved, tmp_path, text):
    _, path = saved
    (tmp_path / "config.json").write_text(text)
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        moeco.load_pretrained(tmp_path)


def test_loading_a_model_larger_than_memory_names_the_size(saved, monkeypatch):
    from moeco import resources

    _, path = saved
    monkeypatch.setattr(resources, "available_bytes", lambda device: 1000)
    with pytest.raises(ConfigError, match=r"the weights of .* \(0.3M parameters in float32\) need 1.1 MB but cpu "
                                          r"has only 1.0 kB free"):
        moeco.load_pretrained(path)


# ---- the command line -----------------------------------------------------------------------
def cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.err.strip(), captured.out


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "nan"], "--temperature nan is invalid: must be a finite number >= 0"),
    (["--temperature", "inf"], "--temperature inf is invalid"),
    (["--top-p", "nan"], "--top-p nan is invalid"),
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device 'cuda"),
    (["--device", "toaster"], "--device 'toaster' is not a device"),
])
def test_generate_cli_bad_arguments_are_one_line(saved, capsys, extra, message):
    _, path = saved
    code, err, _ = cli(["generate", str(path), "--prompt-ids", "1,2", "--max-new-tokens", "2", *extra], capsys)
    assert code == 2 and "\n" not in err and message in err, err


def test_generate_cli_corrupt_tokenizer_is_one_line(saved, tmp_path, capsys):
    model, _ = saved
    model.save_pretrained(tmp_path / "m", extra_files={"tokenizer.json": b'{"version": "1.0", "trunc'})
    code, err, _ = cli(["generate", str(tmp_path / "m"), "--prompt", "hi", "--max-new-tokens", "2"], capsys)
    assert code == 2 and "\n" not in err and "tokenizer.json' cannot be read as a tokenizer" in err


def test_demo_refuses_to_replace_a_model_without_overwrite(saved, tmp_path, capsys):
    model, _ = saved
    model.save_pretrained(tmp_path / "trained", extra_files={"tokenizer.json": b"{}"})
    before = snapshot(tmp_path / "trained")
    code, err, _ = cli(["demo", "--out", str(tmp_path / "trained")], capsys)
    assert code == 2 and "already holds a model" in err and "--overwrite" in err and "\n" not in err
    assert snapshot(tmp_path / "trained") == before
    assert cli(["demo", "--out", str(tmp_path / "trained"), "--overwrite"], capsys)[0] == 0
    assert (tmp_path / "trained" / "tokenizer.json").read_text() == "{}"
    assert cli(["demo", "--out", str(tmp_path / "fresh")], capsys)[0] == 0
    code, err, _ = cli(["demo", "--out", str(tmp_path / "big"), "--preset", "deepseek-v3"], capsys)
    assert code == 2 and "need" in err and " TB but cpu has only" in err and not (tmp_path / "big").exists()


@pytest.mark.parametrize("name, message", [
    ("x.xyz", ".xyz is not an image format matplotlib writes"),
    ("", "is a folder"),
    ("file.txt/x.png", "cannot be written"),
])
def test_plan_plot_to_a_bad_path_is_one_line(tmp_path, capsys, name, message):
    (tmp_path / "file.txt").write_text("x")
    code, err, _ = cli(["plan", "model", "tiny", "--plot", str(tmp_path / name)], capsys)
    assert code == 2 and "\n" not in err and message in err, err


def test_plan_model_tiny_prints_millions(capsys):
    code, _, out = cli(["plan", "model", "tiny"], capsys)
    assert code == 0 and "0.00 B" not in out and "2.59 M" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"moeco {moeco.__version__}"


def test_disk_full_anywhere_is_one_line(monkeypatch, capsys, tmp_path):
    from moeco import generate_cli

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model.safetensors"))

    monkeypatch.setattr(generate_cli, "run_demo", full)
    code, err, _ = cli(["demo", "--out", str(tmp_path)], capsys)
    assert code == 2 and "\n" not in err and "no space left on the device writing" in err


def test_print_config_shows_the_presets_model_fields(capsys):
    code, _, out = cli(["train", "--preset", "small", "--print-config"], capsys)
    assert code == 0 and "# hidden_size = 1536" in out and "# n_routed_experts = 64" in out
    code, _, out = cli(["train", "--print-config", "--set", "model.hidden_size=64"], capsys)
    assert "hidden_size = 64" in out and "# hidden_size" not in out and "# vocab_size = 4096" in out


def test_tiny_preset_brings_its_training_defaults(capsys, tmp_path):
    def value(argv, key):
        code, _, out = cli(["train", *argv, "--print-config"], capsys)
        return next(line.split(" = ")[1] for line in out.splitlines() if line.startswith(f"{key} = "))

    assert value([], "lr") == "0.002" and value([], "warmup_steps") == "30"
    assert value(["--preset", "small"], "lr") == "0.001"
    assert value(["--set", "train.lr=3e-4"], "lr") == "0.0003"
    (tmp_path / "c.toml").write_text("[train]\nwarmup_steps = 7\n")
    assert value(["--config", str(tmp_path / "c.toml")], "warmup_steps") == "7"
    assert value(["--config", str(tmp_path / "c.toml")], "lr") == "0.002"


def test_bias_update_speed_is_derived_from_the_run_length():
    assert TrainConfig(steps=300).balance_gamma() == pytest.approx(0.01)
    assert TrainConfig(steps=1000).balance_gamma() == pytest.approx(0.003)
    assert TrainConfig(steps=100_000).balance_gamma() == pytest.approx(0.001)
    assert TrainConfig(bias_update_speed=0.0).balance_gamma() == 0.0


def test_a_collapsing_expert_load_is_warned_about_once(caplog):
    from moeco.train.balance import ImbalanceWatch

    watch = ImbalanceWatch(gamma=0.001, ratio=2.0, steps=5)
    with caplog.at_level(logging.WARNING):
        said = [watch.update({"step": s, "expert_load": {"1": 1.2, "2": 3.9 if s > 2 else 1.1}})
                for s in range(1, 12)]
    assert [s for s, text in enumerate(said, 1) if text] == [7]
    assert "stayed above 2 for 5 steps (layer 2: 3.90 at step 7)" in caplog.text
    assert "raise train.bias_update_speed (now 0.001)" in caplog.text


@pytest.mark.parametrize("change, field", [
    ({"rope_scaling": 5}, "rope_scaling = 5"),
    ({"rope_parameters": [1]}, "rope_parameters = [1]"),
    ({"aux_loss_alpha": "x"}, "aux_loss_alpha = 'x'"),
    ({"initializer_range": -0.02}, "initializer_range = -0.02"),
    ({"norm_topk_prob": "False"}, "norm_topk_prob = 'False'"),
])
def test_config_json_with_a_wrong_type_is_one_line(change, field):
    with pytest.raises(ConfigError, match=rf"ModelConfig.{field.replace('[', '.').replace(']', '.')} is invalid"):
        ModelConfig.from_hf({**ModelConfig.preset("tiny").to_hf_dict(), **change})
