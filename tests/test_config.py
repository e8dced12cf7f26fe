import json

import pytest

from moeco import ConfigError, ModelConfig
from moeco.config import PRESETS


def test_deepseek_v3_preset_matches_published_config():
    c = ModelConfig.preset("deepseek-v3")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (7168, 61, 128)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (1536, 512, 128, 64, 128)
    assert (c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok) == (256, 1, 8)
    assert (c.n_group, c.topk_group, c.topk_method, c.scoring_func) == (8, 4, "noaux_tc", "sigmoid")
    assert (c.routed_scaling_factor, c.first_k_dense_replace, c.num_nextn_predict_layers) == (2.5, 3, 1)
    assert c.rope_scaling["factor"] == 40 and c.rope_scaling["original_max_position_embeddings"] == 4096
    # ISCA Table 1: 70.272 KB per token in BF16
    assert c.kv_cache_bytes_per_token(2) == 70272


def test_small_preset_is_the_benchmark_size():
    c = ModelConfig.preset("small")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank) == (1536, 12, 16, 512, 256)
    assert (c.qk_rope_head_dim, c.qk_nope_head_dim, c.v_head_dim) == (32, 64, 64)
    assert (c.n_routed_experts, c.n_group, c.num_experts_per_tok, c.topk_group, c.n_shared_experts) == (64, 8, 6, 4, 1)
    assert (c.moe_intermediate_size, c.first_k_dense_replace, c.intermediate_size) == (768, 1, 6144)
    assert (c.vocab_size, c.max_position_embeddings, c.num_nextn_predict_layers) == (32000, 4096, 1)


def test_v2_lite_has_no_query_compression_and_greedy_softmax_routing():
    c = ModelConfig.preset("deepseek-v2-lite")
    assert c.q_lora_rank is None and c.topk_method == "greedy" and c.scoring_func == "softmax"
    assert ModelConfig.preset("deepseek-v2").topk_method == "group_limited_greedy"


@pytest.mark.parametrize("name", list(PRESETS))
def test_hf_round_trip(name, tmp_path):
    c = ModelConfig.preset(name)
    (tmp_path / "config.json").write_text(json.dumps(c.to_hf_dict()))
    assert ModelConfig.from_hf(tmp_path) == c
    assert ModelConfig.from_hf(tmp_path / "config.json") == c


def test_transformers5_spellings_are_read():
    old = ModelConfig.preset("deepseek-v3").to_hf_dict()
    new = dict(old)
    new["num_mtp_layers"] = new.pop("num_nextn_predict_layers")
    scaling = dict(new.pop("rope_scaling"))
    scaling["rope_type"] = scaling.pop("type")
    new["rope_parameters"] = {"rope_theta": new.pop("rope_theta"), **scaling}
    assert ModelConfig.from_hf(new) == ModelConfig.from_hf(old)


def test_official_v2_lite_spelling_q_lora_rank_zero_means_none():
    d = ModelConfig.preset("deepseek-v2-lite").to_hf_dict()
    d["q_lora_rank"] = 0
    assert ModelConfig.from_hf(d).q_lora_rank is None


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(n_routed_experts=10, n_group=4), "n_group"),
        (dict(topk_group=9), "topk_group"),
        (dict(topk_group=1, num_experts_per_tok=5), "num_experts_per_tok"),
        (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
        (dict(scoring_func="relu"), "scoring_func"),
        (dict(topk_method="best"), "topk_method"),
        (dict(hidden_size=0), "hidden_size"),
        (dict(first_k_dense_replace=9), "first_k_dense_replace"),
        (dict(q_lora_rank=-1), "q_lora_rank"),
        (dict(rope_scaling={"type": "ntk", "factor": 2}), "rope_scaling.type"),
        (dict(rope_scaling={"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 64}), "rope_scaling.factor"),
        (dict(n_group=8, topk_group=4, n_routed_experts=8), "n_group"),  # noaux_tc needs >= 2 experts per group
    ],
)
def test_invalid_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError) as err:
        ModelConfig.preset("tiny").replace(**changes)
    message = str(err.value)
    assert f"ModelConfig.{field} = " in message and "\n" not in message


def test_unknown_preset_and_field():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        ModelConfig.preset("huge")
    with pytest.raises(ConfigError, match="no field 'hiden_size'"):
        ModelConfig.preset("tiny").replace(hiden_size=3)


def test_bad_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_hf(tmp_path / "nope.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)


def test_replace_head_count_rederives_kv_heads():
    c = ModelConfig.preset("tiny").replace(num_attention_heads=8)
    assert c.num_key_value_heads == 8
