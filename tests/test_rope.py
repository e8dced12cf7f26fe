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
    from moeco.precision import DEFAULT_RECIPE

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


# ---- rope_interleave: false (half-split rotary rows in the checkpoint) ---------------------
def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _hf_half_split_checkpoint(path, cfg, seed):
    """A checkpoint written by transformers with rope_interleave=false: its rotary rows are half-split."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    hf = transformers.DeepseekV3ForCausalLM(_hf_config(cfg)).float().eval()
    sharp_attention(hf, seed=seed)
    with torch.no_grad():  # biases (attention_bias) start at zero, where a wrong row order would not show
        for name, p in hf.named_parameters():
            if ".self_attn." in name and name.endswith(".bias"):
                p.normal_(std=0.5)
    hf.save_pretrained(path)
    return hf


@pytest.mark.parametrize("q_lora_rank, bias", [(None, False), (32, True)])
def test_half_split_checkpoint_from_transformers_loads_and_saves_back(q_lora_rank, bias, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = micro_config(rope_interleave=False, q_lora_rank=q_lora_rank, attention_bias=bias, num_nextn_predict_layers=0)
    hf = _hf_half_split_checkpoint(tmp_path / "hf", cfg, seed=41)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    want = _logits(hf, ids)
    model = moeco.load_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert model.config.rope_interleave is False
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-4, rtol=0)
    # moeco writes the flag back and the rows in the checkpoint's layout: transformers reads it as before
    model.save_pretrained(tmp_path / "moeco")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moeco", dtype=torch.float32).eval()
    assert again.config.rope_interleave is False
    torch.testing.assert_close(_logits(again, ids), want, atol=1e-4, rtol=0)
    # the other way: the same model saved interleaved is read by transformers' interleaved RoPE
    model.config = model.config.replace(rope_interleave=True)
    model.save_pretrained(tmp_path / "interleaved")
    inter = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "interleaved", dtype=torch.float32).eval()
    assert inter.config.rope_interleave is True
    torch.testing.assert_close(_logits(inter, ids), want, atol=1e-4, rtol=0)


def test_the_flag_decides_the_attention_transformers_computes(tmp_path):
    """The layouts differ visibly: a half-split checkpoint read as interleaved gives other logits."""
    cfg = micro_config(rope_interleave=False, num_nextn_predict_layers=0)
    _hf_half_split_checkpoint(tmp_path, cfg, seed=42)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    right = _logits(moeco.load_pretrained(tmp_path, dtype=torch.float32), ids)
    import json

    raw = json.loads((tmp_path / "config.json").read_text())
    raw["rope_interleave"] = True
    (tmp_path / "config.json").write_text(json.dumps(raw))
    wrong = _logits(moeco.load_pretrained(tmp_path, dtype=torch.float32), ids)
    assert (right - wrong).abs().max() > 0.1


@pytest.mark.parametrize("interleave", [True, False])
def test_moeco_round_trip_keeps_the_model_and_writes_the_layout(interleave, tmp_path):
    from safetensors.torch import load_file

    cfg = micro_config(rope_interleave=interleave)
    torch.manual_seed(43)
    model = sharp_attention(moeco.Transformer(cfg).eval(), seed=43)
    model.save_pretrained(tmp_path / "ck")
    loaded = moeco.load_pretrained(tmp_path / "ck", dtype=torch.float32)
    assert loaded.config.rope_interleave is interleave
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    stored = load_file(str(tmp_path / "ck/model.safetensors"))
    L, dn, dr, qk, C = cfg.num_hidden_layers, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.qk_head_dim, cfg.kv_lora_rank
    for layer, module in [(i, model.model.layers[i]) for i in range(L)] + [(L, model.mtp[0])]:
        attn = module.self_attn
        q_b = stored[f"model.layers.{layer}.self_attn.q_b_proj.weight"].view(cfg.num_attention_heads, qk, -1)
        kv_a = stored[f"model.layers.{layer}.self_attn.kv_a_proj_with_mqa.weight"]
        q_rows = attn.q_b_proj.weight.view(cfg.num_attention_heads, qk, -1)[:, dn:]
        kv_rows = attn.kv_a_proj_with_mqa.weight[C:]
        if not interleave:  # stored half-split: the even rotary rows first, then the odd ones
            q_rows = torch.cat([q_rows[:, 0::2], q_rows[:, 1::2]], dim=1)
            kv_rows = torch.cat([kv_rows[0::2], kv_rows[1::2]])
        assert torch.equal(q_b[:, dn:], q_rows) and torch.equal(q_b[:, :dn], attn.q_b_proj.weight.view(
            cfg.num_attention_heads, qk, -1)[:, :dn])
        assert torch.equal(kv_a[C:], kv_rows) and torch.equal(kv_a[:C], attn.kv_a_proj_with_mqa.weight[:C])


def test_half_split_fp8_checkpoint_keeps_its_scales_and_loads_either_way(tmp_path):
    """An FP8 checkpoint with half-split rotary rows (V3's 128-row blocks hold whole rotary segments):
    keep_fp8 reorders FP8 rows inside their scale blocks, equals the dequantized load, saves back byte-exact."""
    from safetensors.torch import load_file

    cfg = micro_config(rope_interleave=False, hidden_size=160, q_lora_rank=96, intermediate_size=200,
                       moe_intermediate_size=72)
    torch.manual_seed(44)
    sharp_attention(moeco.Transformer(cfg), std=0.2, seed=44).save_pretrained(tmp_path / "fp8", fp8=True)
    deq = moeco.load_pretrained(tmp_path / "fp8", dtype=torch.float32)
    kept = moeco.load_pretrained(tmp_path / "fp8", dtype=torch.float32, keep_fp8=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    torch.testing.assert_close(_logits(kept, ids), _logits(deq, ids), atol=1e-4, rtol=0)
    kept.save_pretrained(tmp_path / "again")
    a, b = load_file(str(tmp_path / "fp8/model.safetensors")), load_file(str(tmp_path / "again/model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k].view(torch.uint8) if a[k].dtype == torch.float8_e4m3fn else a[k],
                           b[k].view(torch.uint8) if b[k].dtype == torch.float8_e4m3fn else b[k]), k


def test_fp8_rotary_rows_that_would_cross_a_scale_block_are_refused_in_one_line(tmp_path):
    # head 0's rotary rows are 124..131 of q_b_proj: half-split to interleaved moves rows across row 128
    cfg = micro_config(rope_interleave=False, qk_nope_head_dim=124, qk_rope_head_dim=8, num_nextn_predict_layers=0)
    torch.manual_seed(45)
    moeco.Transformer(cfg).save_pretrained(tmp_path / "fp8", fp8=True)
    moeco.load_pretrained(tmp_path / "fp8")  # dequantized first: any row order is fine
    with pytest.raises(moeco.LoadError, match=r"rope_interleave=false: .*q_b_proj\.weight.*scale block") as err:
        moeco.load_pretrained(tmp_path / "fp8", keep_fp8=True)
    assert "\n" not in str(err.value)


def test_rope_interleave_must_be_a_bool():
    with pytest.raises(moeco.ConfigError, match="rope_interleave"):
        micro_config(rope_interleave="false")


@pytest.mark.parametrize("preset", ["deepseek-v3", "deepseek-v2-lite", "deepseek-v2"])
def test_release_shapes_reorder_rotary_rows_within_their_fp8_blocks(preset):
    """DeepSeek's shapes (qk_head_dim 192, rotary segments of 64 rows starting at multiples of 64):
    a half-split FP8 release would reorder within blocks only, so its scales stay valid."""
    from moeco.checkpoint import rope_rows_permutation

    cfg = moeco.ModelConfig.preset(preset).replace(rope_interleave=False)
    q_name = "q_proj" if cfg.q_lora_rank is None else "q_b_proj"
    for name, rows in ((f"model.layers.0.self_attn.{q_name}.weight", cfg.num_attention_heads * cfg.qk_head_dim),
                       ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", cfg.latent_dim)):
        perm = rope_rows_permutation(cfg, name, rows)
        assert sorted(perm.tolist()) == list(range(rows)) and not torch.equal(perm, torch.arange(rows))
        assert torch.equal(perm // 128, torch.arange(rows) // 128)
        back = rope_rows_permutation(cfg, name, rows, to_interleaved=False)
        assert torch.equal(perm[back], torch.arange(rows))
    assert rope_rows_permutation(cfg.replace(rope_interleave=True), "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                                 cfg.latent_dim) is None
