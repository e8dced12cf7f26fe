"""Parity with transformers' DeepseekV3ForCausalLM, the reference implementation we must match.

Attention weights are drawn large (helpers.sharp_attention): with small random weights attention is
near uniform and RoPE, mask or softmax-scale differences would pass unseen."""

import pytest
import torch

import moeco
from moeco.generate import generate
from helpers import micro_config, sharp_attention

transformers = pytest.importorskip("transformers")

VARIANTS = {
    "q_compression": dict(),
    "no_q_compression": dict(q_lora_rank=None),
    "one_group": dict(n_group=1, topk_group=1),
    "all_groups": dict(n_group=4, topk_group=4, num_experts_per_tok=4),
    "two_dense_layers": dict(num_hidden_layers=4, first_k_dense_replace=2, n_group=2, topk_group=1),
    "yarn": dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                               "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),
    "yarn_v3_mscale": dict(rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 16,
                                         "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
}


def _randomize_bias(model_or_hf):
    for name, buf in model_or_hf.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.rand_like(buf) * 0.2 - 0.1)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_transformers_checkpoint_loads_in_moeco(variant, tmp_path):
    cfg = micro_config(num_nextn_predict_layers=0, **VARIANTS[variant])
    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.to_hf_dict().items()
                                                     if k not in ("architectures",)})
    hf = sharp_attention(transformers.DeepseekV3ForCausalLM(hf_config).float().eval())
    with torch.no_grad():
        _randomize_bias(hf)
    hf.save_pretrained(tmp_path)
    model = moeco.load_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    with torch.no_grad():
        ref = hf(ids).logits
        got = model(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("variant", ["q_compression", "no_q_compression", "yarn", "two_dense_layers"])
def test_moeco_checkpoint_loads_in_transformers_and_generates_the_same(variant, tmp_path):
    cfg = micro_config(**VARIANTS[variant])
    torch.manual_seed(1)
    model = sharp_attention(moeco.Transformer(cfg).eval())
    with torch.no_grad():
        _randomize_bias(model)
    model.save_pretrained(tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)
    prompt = ids[:1, :8]
    ours = generate(model, prompt, max_new_tokens=16)
    theirs = hf.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0,
                         attention_mask=torch.ones_like(prompt))
    assert ours.tolist() == theirs.tolist()


def test_bias_changes_selection_not_weights():
    cfg = micro_config()
    torch.manual_seed(2)
    model = moeco.Transformer(cfg)
    gate = next(moe for _, moe in model.moe_layers()).gate
    x = torch.randn(64, cfg.hidden_size)
    base = gate(x)
    with torch.no_grad():
        gate.e_score_correction_bias[0] = 10.0  # expert 0 becomes everyone's choice
    biased = gate(x)
    assert (biased.indices_TK == 0).any(dim=1).all()
    assert not torch.equal(base.indices_TK, biased.indices_TK)
    # the weight of each chosen expert is its unbiased score, normalised and scaled
    w = base.scores_TE.gather(1, biased.indices_TK)
    expected = w / w.sum(-1, keepdim=True) * cfg.routed_scaling_factor
    torch.testing.assert_close(biased.weights_TK, expected)


@pytest.mark.parametrize("routing", [dict(topk_method="group_limited_greedy", n_group=4, topk_group=2),
                                     dict(topk_method="greedy", n_group=1, topk_group=1, q_lora_rank=None)])
def test_deepseek_v2_routing_matches_transformers_v2(routing, tmp_path):
    """V2 / V2-Lite: softmax scores, group max (or no groups), no top-k normalisation, x16 scaling."""
    cfg = micro_config(scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=16.0,
                       num_nextn_predict_layers=0, **routing)
    hf_dict = {k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"}
    hf_dict["model_type"] = "deepseek_v2"
    torch.manual_seed(12)
    hf = transformers.DeepseekV2ForCausalLM(transformers.AutoConfig.for_model(**hf_dict)).float().eval()
    hf.save_pretrained(tmp_path)
    model = moeco.load_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, atol=1e-4, rtol=0)
