"""Model costs: the published figures (ISCA Tables 1 and 2, DeepSeek-V3's 671B / 37B) and the readers."""

import pytest

from moeco import ConfigError, ModelConfig
from moeco.plan.arch import arch_from_hf, load_arch, preset_names
from moeco.plan.costs import (
    flops_breakdown, forward_flops_per_token, kv_bytes_per_token, model_summary, param_counts,
    train_flops_per_token,
)

import runpy
from pathlib import Path

HF_CONFIGS = runpy.run_path(str(Path(__file__).with_name("test_plan_configs.py")))["HF_CONFIGS"]


# ---- ISCA Table 1: KV cache per token, BF16, all layers ------------------------------------
def test_isca_table1_kv_bytes_deepseek_v3_mla():
    """ISCA Table 1: DeepSeek-V3 (MLA) 70.272 KB per token = 61 x (512 + 64) x 2."""
    assert kv_bytes_per_token("deepseek-v3") == 70_272
    assert kv_bytes_per_token(ModelConfig.preset("deepseek-v3")) == 70_272


def test_isca_table1_kv_bytes_qwen25_72b_gqa():
    """ISCA Table 1: Qwen-2.5 72B (GQA) 327.680 KB per token, 4.66x DeepSeek-V3."""
    assert kv_bytes_per_token("qwen2.5-72b") == 327_680
    assert round(327_680 / kv_bytes_per_token("deepseek-v3"), 2) == 4.66


def test_isca_table1_kv_bytes_llama31_405b_gqa():
    """ISCA Table 1: LLaMA-3.1 405B (GQA) 516.096 KB per token (the paper's 7.28x is really 7.344x)."""
    assert kv_bytes_per_token("llama-3.1-405b") == 516_096
    assert kv_bytes_per_token("llama-3.1-405b") / 70_272 == pytest.approx(7.344, abs=1e-3)


def test_kv_bytes_fp8_halves_bf16():
    assert kv_bytes_per_token("deepseek-v3", "fp8") == 35_136
    with pytest.raises(ConfigError, match="kv dtype"):
        kv_bytes_per_token("deepseek-v3", "int3")


# ---- ISCA Table 2: training compute per token at 4096 ----------------------------------------
def test_isca_table2_train_gflops_deepseek_v3():
    """ISCA Table 2: DeepSeek-V3 250 GFLOP per token (causal, s = 4096)."""
    assert train_flops_per_token(ModelConfig.preset("deepseek-v3"), seq_len=4096) / 1e9 == pytest.approx(250, abs=1)
    assert train_flops_per_token("deepseek-v3") / 1e9 == pytest.approx(250.45, abs=0.01)


def test_isca_table2_train_gflops_deepseek_v2():
    """ISCA Table 2: DeepSeek-V2 155 GFLOP per token (causal, s = 4096)."""
    assert train_flops_per_token(ModelConfig.preset("deepseek-v2"), 4096) / 1e9 == pytest.approx(155, abs=1)


def test_isca_table4_cross_check_causal_flops():
    """ISCA Table 4: 385 causal TFLOPS x 2048 GPUs / 272.80B tokens per day = 249.7 GFLOP per token."""
    implied = 385e12 * 2048 / (272.80e9 / 86400) / 1e9
    assert train_flops_per_token("deepseek-v3") / 1e9 == pytest.approx(implied, rel=0.005)
    # non-causal (Megatron) count, 432 TFLOPS in the same table: 280.2 implied, 281.2 ours
    assert train_flops_per_token("deepseek-v3", causal=False) / 1e9 == pytest.approx(281.2, abs=0.1)


def test_isca_table2_dense_rows_follow_our_convention_not_the_paper():
    """ISCA Table 2 dense rows (394, 2448) are not reproducible (facts §17); ours are 444.9 and 2473.2."""
    assert train_flops_per_token("qwen2.5-72b") / 1e9 == pytest.approx(444.9, abs=0.1)
    assert train_flops_per_token("llama-3.1-405b") / 1e9 == pytest.approx(2473.2, abs=0.1)


def test_forward_is_a_third_of_train():
    cfg = ModelConfig.preset("deepseek-v3")
    assert train_flops_per_token(cfg, 4096) == pytest.approx(3 * forward_flops_per_token(cfg, 4096))
    assert forward_flops_per_token(cfg, 8192) > forward_flops_per_token(cfg, 4096)


# ---- parameter counts ------------------------------------------------------------------------
def test_deepseek_v3_671b_total_37b_active():
    """TR / ISCA: DeepSeek-V3 has 671B parameters, 37B activated per token (within 2%)."""
    p = param_counts("deepseek-v3")
    assert p.total / 1e9 == pytest.approx(671, rel=0.02)
    assert p.active / 1e9 == pytest.approx(37, rel=0.02)
    # README_WEIGHTS: the MTP module holds 11.5B unique parameters
    assert p.mtp_total / 1e9 == pytest.approx(11.5, rel=0.02)


def test_deepseek_v2_236b_total_21b_active():
    """ISCA §2.2.2: DeepSeek-V2 236B total, 21B active (embedding excluded, facts §1)."""
    p = param_counts("deepseek-v2")
    assert p.total / 1e9 == pytest.approx(236, rel=0.01)
    assert (p.active - p.embedding) / 1e9 == pytest.approx(21, rel=0.02)


def test_other_families_published_sizes():
    """Published sizes: Mixtral 8x7B 46.7B/12.9B, Qwen3-30B-A3B 30.5B/3.3B, Llama-3.1-70B 70.6B."""
    assert param_counts("mixtral-8x7b").total / 1e9 == pytest.approx(46.7, rel=0.01)
    assert param_counts("mixtral-8x7b").active / 1e9 == pytest.approx(12.9, rel=0.01)
    assert param_counts("qwen3-30b-a3b").total / 1e9 == pytest.approx(30.5, rel=0.01)
    assert param_counts("qwen3-30b-a3b").active / 1e9 == pytest.approx(3.3, rel=0.03)
    assert param_counts("llama-3.1-70b").total / 1e9 == pytest.approx(70.6, rel=0.01)


def test_breakdown_sums_to_forward():
    for name in preset_names():
        parts = flops_breakdown(name)
        assert sum(v["forward_flops"] for v in parts.values()) == pytest.approx(forward_flops_per_token(name))
        summary = model_summary(name)
        assert summary["params_active"] <= summary["params_total"]


# ---- readers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", sorted(HF_CONFIGS))
def test_every_family_reads_and_costs(family):
    arch = arch_from_hf(HF_CONFIGS[family])
    s = model_summary(arch)
    assert s["params_total"] > 0 and s["kv_cache_bytes_per_token"] > 0 and s["train_flops_per_token"] > 0


def test_hand_written_qwen3_moe_layers():
    raw = dict(HF_CONFIGS["qwen3_moe"], mlp_only_layers=[0], decoder_sparse_step=1)
    a = arch_from_hf(raw)
    assert (a.n_dense_layers, a.n_moe_layers) == (1, a.num_hidden_layers - 1)


def test_tied_embeddings_count_once():
    raw = dict(HF_CONFIGS["qwen2"], tie_word_embeddings=True)
    assert param_counts(arch_from_hf(raw)).head == 0
    assert train_flops_per_token(arch_from_hf(raw)) == train_flops_per_token(arch_from_hf(HF_CONFIGS["qwen2"]))


@pytest.mark.parametrize("raw, field", [
    ({"model_type": "gpt2", "hidden_size": 8}, "model_type"),
    ({"model_type": "llama", "num_hidden_layers": 2}, "hidden_size"),
    ({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
      "num_key_value_heads": 3, "vocab_size": 10, "intermediate_size": 8}, "num_key_value_heads"),
    ({"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 8,
      "vocab_size": 10, "intermediate_size": 8, "num_local_experts": 2, "num_experts_per_tok": 3},
     "num_experts_per_tok"),
    ({"model_type": "qwen2", "hidden_size": -1}, "hidden_size"),
    ({"model_type": "deepseek_v3", "hidden_size": 0}, "hidden_size"),
])
def test_bad_configs_name_the_field(raw, field):
    with pytest.raises(ConfigError, match=field) as info:
        arch_from_hf(raw)
    assert "\n" not in str(info.value)


def test_unknown_model_name():
    with pytest.raises(ConfigError, match="neither a preset"):
        load_arch("no-such-model")


# ---- MTP FLOPs (not in Table 2; the trainer's MFU counts them) -----------------------------
def test_mtp_flops_formula_counts_what_the_model_runs():
    """torch's FlopCounterMode on moeco's model: the main forward and the D = 2 MTP depths (each over
    s - k positions: layer, eh_proj, shared head) cost exactly what the planner says (full attention:
    the counter charges SDPA's causal kernel for every key)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import moeco
    from helpers import micro_config
    from moeco.plan.costs import mtp_forward_flops_per_token

    cfg = micro_config(num_nextn_predict_layers=2)
    model = moeco.Transformer(cfg).eval()
    B, S = 2, 16
    ids = torch.randint(0, cfg.vocab_size, (B, S))

    def measured(**kwargs):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(ids, **kwargs)
        return counter.get_total_flops()

    main, with_mtp = measured(), measured(return_mtp=True)
    assert main == forward_flops_per_token(cfg, S, causal=False) * B * S
    assert with_mtp - main == pytest.approx(mtp_forward_flops_per_token(cfg, S, causal=False) * B * S, rel=1e-12)
    assert mtp_forward_flops_per_token(cfg.replace(num_nextn_predict_layers=0), S) == 0


def test_trainer_mfu_credits_the_mtp_module():
    from moeco.plan.costs import mtp_forward_flops_per_token
    from moeco.train.metrics import flops_per_token

    cfg = ModelConfig.preset("deepseek-v3")
    table2 = train_flops_per_token(cfg, 4096)
    assert flops_per_token(cfg, 4096) == pytest.approx(table2 + 3 * mtp_forward_flops_per_token(cfg, 4096))
    assert train_flops_per_token(cfg, 4096, mtp=True) / 1e9 == pytest.approx(260.64, abs=0.01)
    assert mtp_forward_flops_per_token(cfg, 4096) / 1e9 == pytest.approx(3.40, abs=0.01)
    no_mtp = cfg.replace(num_nextn_predict_layers=0)
    assert flops_per_token(no_mtp, 4096) == pytest.approx(train_flops_per_token(no_mtp, 4096))
