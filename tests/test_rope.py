"""Rotary embedding: float32 frequencies whatever the model's dtype, YaRN in all its config spellings
(with and without mscale / mscale_all_dim), and checkpoints whose rotary rows are stored half-split
(`rope_interleave: false`).

Attention is made sharp (helpers.sharp_attention) wherever logits are compared: with small random
weights attention is near uniform and a RoPE or softmax-scale error changes almost nothing.
"""

import math

import pytest
import torch

import moeco
from helpers import micro_config, sharp_attention
from moeco.model.layers import RotaryEmbedding, rope_inv_freq


# ---- float32 frequencies ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inv_freq_stays_exact_float32_when_the_model_is_cast(dtype):
    cfg = micro_config(qk_rope_head_dim=16)
    exact, _ = rope_inv_freq(cfg)
    model = moeco.Transformer(cfg).to(dtype)
    assert model.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(model.rotary.inv_freq, exact)  # restored, not a round trip through bf16
    assert torch.equal(model.float().rotary.inv_freq, exact)
    # far into a long context the angles pos * theta still match the float32 model's
    pos = torch.tensor([100_000])
    cos, sin = model.rotary(pos)
    ref_cos, ref_sin = RotaryEmbedding(cfg)(pos)
    assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


def test_bf16_model_rotates_long_positions_like_a_float32_one():
    """A bf16 model at position 3000: its rotary tables equal the float32 model's (bf16 inv_freq is up to
    0.4% off, and pos * theta then turns a visible fraction of a radian away)."""
    cfg = micro_config(max_position_embeddings=4096)
    torch.manual_seed(0)
    model = moeco.Transformer(cfg)
    ref = RotaryEmbedding(cfg)
    model.to(torch.bfloat16)
    pos = torch.arange(3000, 3008)
    got, want = model.rotary(pos), ref(pos)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# ---- YaRN without mscale / mscale_all_dim -------------------------------------------------
def _yarn(**extra):
    return {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "beta_fast": 32,
            "beta_slow": 1, **extra}


YARN_VARIANTS = {  # DeepSeek's releases set both; other YaRN configs set one or neither
    "neither": _yarn(),
    "only_mscale": _yarn(mscale=0.707),
    "only_mscale_all_dim": _yarn(mscale_all_dim=1.0),
    "both_equal": _yarn(mscale=1.0, mscale_all_dim=1.0),
    "both_differ": _yarn(mscale=1.0, mscale_all_dim=0.707),
}
# attention_factor on cos/sin and the softmax scale's multiplier, from the YaRN formulas
# (mscale(s, m) = 0.1 m ln s + 1; facts §7): the cos/sin factor is mscale(s, mscale) / mscale(s,
# mscale_all_dim) only when both are set, else mscale(s, 1); the softmax scale gets mscale(s,
# mscale_all_dim)^2 whenever mscale_all_dim is set.
_M = lambda m: 0.1 * m * math.log(8.0) + 1.0  # noqa: E731
YARN_EXPECTED = {
    "neither": (_M(1.0), 1.0),
    "only_mscale": (_M(1.0), 1.0),
    "only_mscale_all_dim": (_M(1.0), _M(1.0) ** 2),
    "both_equal": (1.0, _M(1.0) ** 2),
    "both_differ": (_M(1.0) / _M(0.707), _M(0.707) ** 2),
}


def _hf_config(cfg):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoConfig.for_model(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})


@pytest.mark.parametrize("variant", list(YARN_VARIANTS))
def test_yarn_factors_follow_the_formulas_and_transformers(variant):
    cfg = micro_config(rope_scaling=YARN_VARIANTS[variant])
    attention_factor, softmax_mult = YARN_EXPECTED[variant]
    inv_freq, factor = rope_inv_freq(cfg)
    assert factor == pytest.approx(attention_factor, rel=1e-12)
    assert cfg.softmax_scale() == pytest.approx(cfg.qk_head_dim ** -0.5 * softmax_mult, rel=1e-12)
    from moeco.model.mla import MLA
    from moeco.model.layers import DEFAULT_RECIPE

    assert MLA(cfg, DEFAULT_RECIPE).scale == pytest.approx(cfg.softmax_scale(), rel=1e-12)

    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    hf_cfg = _hf_config(cfg)
    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
    torch.testing.assert_close(inv_freq, hf_inv_freq.float(), atol=0, rtol=1e-6)
    assert factor == pytest.approx(hf_factor, rel=1e-9)
    assert DeepseekV3Attention(hf_cfg, layer_idx=0).scaling == pytest.approx(cfg.softmax_scale(), rel=1e-9)


@pytest.mark.parametrize("variant", ["neither", "only_mscale", "only_mscale_all_dim", "both_differ"])
def test_yarn_model_matches_transformers_with_sharp_attention(variant, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = micro_config(rope_scaling=YARN_VARIANTS[variant], num_nextn_predict_layers=0)
    torch.manual_seed(21)
    model = sharp_attention(moeco.Transformer(cfg).eval(), seed=21)
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40))  # past original_max_position_embeddings = 32
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)
