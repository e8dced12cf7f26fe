"""TrainConfig: TOML in and out, --set overrides of any key (model fields included), validation."""

import pytest

from moeco.errors import ConfigError
from moeco.train.cli import DEFAULT_OUT
from moeco.train.config import TrainConfig
from moeco.train.run_dir import check_model, check_world
from moeco.train.trainer import lr_at


def test_set_overrides_train_and_model_keys():
    cfg = TrainConfig().with_overrides([
        "train.lr=3e-4", "steps=7", "model.hidden_size=256", "num_hidden_layers=3", 'data.path="x y"',
        "model.q_lora_rank=none", "log.interval=2", "train.compile=true",
    ])
    assert cfg.lr == 3e-4 and cfg.steps == 7 and cfg.data_path == "x y" and cfg.log_interval == 2 and cfg.compile
    m = cfg.model_config()
    assert m.hidden_size == 256 and m.num_hidden_layers == 3 and m.q_lora_rank is None
    assert TrainConfig().with_overrides(["data.path=plain/words"]).data_path == "plain/words"


def test_toml_round_trip(tmp_path):
    cfg = TrainConfig().with_overrides(["train.lr=5e-4", "model.hidden_size=96", "model.preset=small",
                                        'model.rope_scaling={type = "yarn", factor = 2, '
                                        'original_max_position_embeddings = 2048}', "model.q_lora_rank=none"])
    path = tmp_path / "c.toml"
    path.write_text(cfg.to_toml())
    back = TrainConfig.from_toml(path)
    assert back == cfg and back.model_config() == cfg.model_config()


@pytest.mark.parametrize("item, message", [
    ("train.nope=1", "unknown option 'train.nope'"),
    ("nope=1", "unknown option 'nope'"),
    ("model.hidden=1", "unknown option"),
    ("train.steps=many", "train.steps = 'many' is invalid: expected int"),
    ("train.steps=0", "train.steps = 0 is invalid"),
    ("train.precision=fp16", "choose one of auto, fp32, bf16, fp8"),
    ("lr", "is not KEY=VALUE"),
])
def test_bad_overrides_are_one_line_errors(item, message):
    with pytest.raises(ConfigError, match=message) as info:
        TrainConfig().with_overrides([item])
    assert "\n" not in str(info.value)


def test_bad_model_field_and_file(tmp_path):
    with pytest.raises(ConfigError, match="hidden_size"):
        TrainConfig().with_overrides(["model.hidden_size=-1"]).model_config()
    with pytest.raises(ConfigError, match="does not exist"):
        TrainConfig.from_toml(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("[train\nsteps=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        TrainConfig.from_toml(tmp_path / "bad.toml")
    (tmp_path / "top.toml").write_text("steps = 1\n")
    with pytest.raises(ConfigError, match="inside a table"):
        TrainConfig.from_toml(tmp_path / "top.toml")


def test_world_and_positions_checks():
    check_world(TrainConfig(batch_size=8), 2)
    with pytest.raises(ConfigError, match="does not divide across 3 rank"):
        check_world(TrainConfig(batch_size=8), 3)
    with pytest.raises(ConfigError, match="micro_batch_size 3"):
        check_world(TrainConfig(batch_size=8, micro_batch_size=3), 1)
    with pytest.raises(ConfigError, match="exceeds the model's max_position_embeddings = 1024"):
        check_model(TrainConfig(seq_len=2048))


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    assert DEFAULT_OUT
