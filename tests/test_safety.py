"""Data safety and bad input (issue 18, part 4): each case a user hit, with the one-line answer it gets now."""

import json

import pytest

from moeco import ConfigError, ModelConfig
from moeco.errors import DataError
from moeco.train.config import TrainConfig
from moeco.train.corpus import load_documents


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
