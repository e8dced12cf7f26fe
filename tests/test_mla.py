"""MLA: the absorbed path over the latent cache equals the plain path; the cache holds only the latent."""

import pytest
import torch

import moeco
from helpers import micro_config
from moeco.model.mla import MLA, LatentCache


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_absorbed_equals_plain_on_random_inputs(q_lora_rank):
    cfg = micro_config(q_lora_rank=q_lora_rank)
    torch.manual_seed(3)
    attn = MLA(cfg, moeco.precision.DEFAULT_RECIPE)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    rope = moeco.model.layers.RotaryEmbedding(cfg)
    x = torch.randn(2, 12, cfg.hidden_size)
    cos, sin = rope(torch.arange(12))
    with torch.no_grad():
        plain = attn(x, cos, sin)
        absorbed = attn(x, cos, sin, absorb=True, cache_BTC=torch.zeros(2, 12, cfg.latent_dim))
    torch.testing.assert_close(absorbed, plain, atol=1e-5, rtol=0)


def test_prefill_then_decode_matches_full_forward():
    cfg = micro_config()
    torch.manual_seed(4)
    model = moeco.Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 20))
    with torch.no_grad():
        full = model(ids, attn_impl="plain")
        cache = model.new_cache(3, 20)
        steps = [model(ids[:, :7], cache=cache)]  # plain prefill writes the latent cache
        for t in range(7, 20):  # absorbed decode reads it
            steps.append(model(ids[:, t:t + 1], cache=cache, start_pos=t, attn_impl="absorbed"))
        # a chunked prefill (several tokens after a cached prefix) must also respect causality
        cache2 = model.new_cache(3, 20)
        model(ids[:, :5], cache=cache2)
        chunk = model(ids[:, 5:20], cache=cache2, start_pos=5, attn_impl="absorbed")
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunk, full[:, 5:], atol=1e-5, rtol=0)
    assert cache.length == 20


@pytest.mark.parametrize("dtype, nbytes", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_cache_bytes_per_token(dtype, nbytes):
    cfg = micro_config()
    cache = LatentCache(cfg, batch=2, max_len=8, dtype=dtype)
    expected = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * nbytes
    assert cache.bytes_per_token() == expected == cfg.kv_cache_bytes_per_token(nbytes)
    assert cache.latent.numel() * cache.latent.element_size() == expected * 2 * 8


def test_deepseek_v3_cache_is_70272_bytes_per_token_in_bf16():
    cfg = moeco.ModelConfig.preset("deepseek-v3")
    cache = LatentCache(cfg, batch=1, max_len=1, dtype=torch.bfloat16, device="meta")
    assert cache.bytes_per_token() == 70272


def test_yarn_softmax_scale_uses_mscale_all_dim():
    cfg = moeco.ModelConfig.preset("deepseek-v3")
    m = 0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1.0
    assert cfg.softmax_scale() == pytest.approx(192 ** -0.5 * m * m)

