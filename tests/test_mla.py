"""MLA: the absorbed path over the latent cache equals the plain path; the cache holds only the latent;
per-token positions let one batch mix sequences at different positions.

Attention weights are drawn large (helpers.sharp_attention) so attention is sharp: with small random weights it is close to
uniform and an error in RoPE, the mask or the softmax scale changes almost nothing.
"""

import math

import pytest
import torch

import moeco
from helpers import micro_config, sharp_attention
from moeco.model.cache import DenseLatentCache, visible
from moeco.model.layers import RotaryEmbedding
from moeco.model.mla import MLA, AttnInputs
from moeco.precision import DEFAULT_RECIPE


def _sharp_model(seed=4, **overrides):
    torch.manual_seed(seed)
    return sharp_attention(moeco.Transformer(micro_config(**overrides)).eval(), seed=seed)


def _attention_entropy(model, ids):
    """Mean entropy (nats) of layer 0's attention rows: the test weights must make it clearly peaked."""
    attn = model.model.layers[0].self_attn
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    S = ids.shape[1]
    cos, sin = model.rotary(torch.arange(S))
    q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x))).view(*ids.shape, attn.n_heads, -1)
    q_nope, q_rot = q.split([attn.dn, attn.dr], -1)
    q_rot = moeco.model.layers.apply_rope_interleaved(q_rot, cos, sin)
    lat, kr = attn.kv_a_proj_with_mqa(x).split([attn.kv_lora_rank, attn.dr], -1)
    kr = moeco.model.layers.apply_rope_interleaved(kr, cos, sin)
    kv = attn.kv_b_proj(attn.kv_a_layernorm(lat)).view(*ids.shape, attn.n_heads, -1)
    k = torch.cat([kv[..., : attn.dn], kr[:, :, None].expand(-1, -1, attn.n_heads, -1)], -1)
    s = torch.einsum("bshd,bthd->bhst", torch.cat([q_nope, q_rot], -1), k) * attn.scale
    s = s.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
    p = s.softmax(-1)
    return float(-(p * p.clamp_min(1e-30).log()).sum(-1)[..., S // 2:].mean())


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_absorbed_equals_plain_on_random_inputs(q_lora_rank):
    cfg = micro_config(q_lora_rank=q_lora_rank)
    torch.manual_seed(3)
    attn = MLA(cfg, DEFAULT_RECIPE)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    cos, sin = RotaryEmbedding(cfg)(torch.arange(12))
    x = torch.randn(2, 12, cfg.hidden_size)
    with torch.no_grad():
        plain = attn(x, AttnInputs(cos, sin))
        absorbed = attn(x, AttnInputs(cos, sin, absorb=True))
        positions = torch.arange(12).expand(2, 12)
        cache = DenseLatentCache(cfg, 2, 12, num_layers=1)
        cached = attn(x, AttnInputs(cos, sin, positions, cache, absorb=True), cache.layer(0))
    torch.testing.assert_close(absorbed, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close(cached, plain, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_impl", ["plain", "absorbed"])
def test_prefill_then_decode_and_chunked_prefill_match_full_forward(chunk_impl):
    """Both attention paths over a cached prefix: the explicit mask of a chunk after a prefix must be
    exactly causal (an off-by-one lets a token see its successor or hides itself)."""
    model = _sharp_model()
    ids = torch.randint(0, model.config.vocab_size, (3, 20))
    with torch.no_grad():  # sharp, not uniform: uniform over the ~15 keys seen is ~2.6 nats
        assert _attention_entropy(model, ids) < 1.0
    with torch.no_grad():
        full = model(ids, attn_impl="plain").logits
        cache = model.new_cache(3, 20)
        steps = [model(ids[:, :7], cache=cache).logits]  # plain prefill writes the latent cache
        for t in range(7, 20):  # absorbed decode reads it
            steps.append(model(ids[:, t:t + 1], torch.full((3, 1), t), cache=cache, attn_impl="absorbed").logits)
        cache2 = model.new_cache(3, 20)
        model(ids[:, :5], cache=cache2)
        chunk = model(ids[:, 5:20], torch.arange(5, 20).expand(3, 15), cache=cache2, attn_impl=chunk_impl).logits
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunk, full[:, 5:], atol=1e-5, rtol=0)


def test_one_batch_mixes_sequences_at_different_positions():
    """Rows decoding at positions 3, 9 and 14 in one step give what each row gives alone."""
    model = _sharp_model(seed=5)
    V = model.config.vocab_size
    prompts = [torch.randint(0, V, (n,)) for n in (3, 9, 14)]
    nxt = torch.randint(0, V, (3, 1))
    with torch.no_grad():
        alone = []
        for p, t in zip(prompts, nxt):
            seq = torch.cat([p, t])[None]
            alone.append(model(seq).logits[0, -1])
        # left-padded prefill at per-row positions, then one decode step at three positions
        P = 14
        ids = torch.zeros(3, P, dtype=torch.long)
        pos = torch.full((3, P), -1)
        for b, p in enumerate(prompts):
            ids[b, P - len(p):] = p
            pos[b, P - len(p):] = torch.arange(len(p))
        cache = model.new_cache(3, 16)
        model(ids, pos, cache=cache)
        step = model(nxt, torch.tensor([[3], [9], [14]]), cache=cache).logits[:, -1]
        # the same without a cache: one forward over a right-padded batch of whole sequences
        ids2 = torch.zeros(3, 15, dtype=torch.long)
        pos2 = torch.full((3, 15), -1)
        for b, (p, t) in enumerate(zip(prompts, nxt)):
            ids2[b, : len(p) + 1] = torch.cat([p, t])
            pos2[b, : len(p) + 1] = torch.arange(len(p) + 1)
        packed = model(ids2, pos2).logits
    want = torch.stack(alone)
    torch.testing.assert_close(step, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed[torch.arange(3), torch.tensor([3, 9, 14])], want, atol=1e-5, rtol=0)


def test_visible_is_causal_by_position_and_ignores_padding():
    q = torch.tensor([[-1, 0, 2]])
    k = torch.tensor([-1, 0, 1, 2, 3])
    assert visible(q, k)[0].int().tolist() == [[0, 1, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 1, 1, 0]]


@pytest.mark.parametrize("dtype, nbytes", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_cache_bytes_per_token(dtype, nbytes):
    cfg = micro_config()
    cache = DenseLatentCache(cfg, batch=2, max_len=8, dtype=dtype)
    expected = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * nbytes
    assert cache.bytes_per_token() == expected == cfg.kv_cache_bytes_per_token(nbytes)
    cache.layer(0).write(torch.ones(2, 1, cfg.latent_dim), torch.tensor([[0], [-1]]))
    rows, key_pos = cache.layer(0).read()
    assert rows.shape == (2, 8, cfg.latent_dim) and key_pos.tolist() == list(range(8))
    assert rows[0, 0].eq(1).all() and rows[1].eq(0).all()  # padding (position -1) writes nothing visible


def test_deepseek_v3_cache_is_70272_bytes_per_token_in_bf16():
    cfg = moeco.ModelConfig.preset("deepseek-v3")
    cache = DenseLatentCache(cfg, batch=1, max_len=1, dtype=torch.bfloat16, device="meta")
    assert cache.bytes_per_token() == 70272


def test_yarn_softmax_scale_uses_mscale_all_dim():
    cfg = moeco.ModelConfig.preset("deepseek-v3")
    m = 0.1 * 1.0 * torch.log(torch.tensor(40.0)).item() + 1.0
    assert cfg.softmax_scale() == pytest.approx(192 ** -0.5 * m * m)
    assert MLA(micro_config(rope_scaling=cfg.rope_scaling), DEFAULT_RECIPE).scale == pytest.approx(
        micro_config(rope_scaling=cfg.rope_scaling).softmax_scale())


def _reference_attention(attn, x, cos, sin, scale):
    """Causal MLA written out from the module's weights, softmax scale given explicitly."""
    B, S, _ = x.shape
    q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x))).view(B, S, attn.n_heads, -1)
    q_nope, q_rot = q.split([attn.dn, attn.dr], -1)
    q_rot = moeco.model.layers.apply_rope_interleaved(q_rot, cos, sin)
    lat, kr = attn.kv_a_proj_with_mqa(x).split([attn.kv_lora_rank, attn.dr], -1)
    kr = moeco.model.layers.apply_rope_interleaved(kr, cos, sin)
    kv = attn.kv_b_proj(attn.kv_a_layernorm(lat)).view(B, S, attn.n_heads, -1)
    k_nope, v = kv.split([attn.dn, attn.dv], -1)
    s = (torch.einsum("bshd,bthd->bhst", q_nope, k_nope) + torch.einsum("bshr,btr->bhst", q_rot, kr)) * scale
    s = s.masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), float("-inf"))
    o = torch.einsum("bhst,bthd->bshd", s.softmax(-1), v)
    return attn.o_proj(o.flatten(2))


def test_mla_attends_with_the_yarn_softmax_scale_on_every_path():
    """The module's attention (plain, absorbed, over a cache) uses qk_head_dim^-0.5 * mscale(s, mscale_all_dim)^2,
    not 1/sqrt(qk_head_dim): with V3's YaRN (s = 40) the two differ by 1.87x, plain to see when attention is sharp."""
    yarn = moeco.ModelConfig.preset("deepseek-v3").rope_scaling
    cfg = micro_config(rope_scaling={**yarn, "original_max_position_embeddings": 16})
    torch.manual_seed(6)
    attn = MLA(cfg, DEFAULT_RECIPE)
    for p in attn.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.5)
    S = 12
    cos, sin = RotaryEmbedding(cfg)(torch.arange(S))
    x = torch.randn(2, S, cfg.hidden_size)
    yarn_scale = cfg.qk_head_dim ** -0.5 * (0.1 * math.log(40) + 1) ** 2
    with torch.no_grad():
        want = _reference_attention(attn, x, cos, sin, yarn_scale)
        unscaled = _reference_attention(attn, x, cos, sin, cfg.qk_head_dim ** -0.5)
        assert (want - unscaled).abs().max() > 100 * 1e-4  # the test can see the difference
        positions = torch.arange(S).expand(2, S)
        cache = DenseLatentCache(cfg, 2, S, num_layers=1)
        got = {
            "plain": attn(x, AttnInputs(cos, sin)),
            "plain_masked": attn(x, AttnInputs(cos, sin, positions)),
            "absorbed": attn(x, AttnInputs(cos, sin, absorb=True)),
            "absorbed_cache": attn(x, AttnInputs(cos, sin, positions, cache, absorb=True), cache.layer(0)),
        }
    for name, out in got.items():
        torch.testing.assert_close(out, want, atol=1e-4, rtol=0, msg=lambda m: f"{name}: {m}")


def test_fp8_absorbed_decode_sees_kv_b_weights_changed_in_place(tmp_path):
    """keep_fp8 (CPU): the absorbed path reuses a dense copy of the FP8 kv_b_proj; after the weights change in
    place (load_state_dict of another checkpoint, or only the block scales) it must use the new ones."""
    cfg = micro_config()
    for seed, name in ((31, "a"), (32, "b")):
        torch.manual_seed(seed)
        sharp_attention(moeco.Transformer(cfg), seed=seed).save_pretrained(tmp_path / name, fp8=True)
    kept = moeco.load_pretrained(tmp_path / "a", keep_fp8=True)
    other = moeco.load_pretrained(tmp_path / "b", keep_fp8=True)
    ids = torch.randint(0, cfg.vocab_size, (2, 9))

    def last_step(model):  # plain prefill of 8 tokens, then one absorbed decode step over the cache
        cache = model.new_cache(2, 9)
        model(ids[:, :8], cache=cache)
        return model(ids[:, 8:], torch.full((2, 1), 8), cache=cache, attn_impl="absorbed").logits

    with torch.no_grad():
        before = last_step(kept)  # builds the dense kv_b copies
        kept.load_state_dict(other.state_dict())
        torch.testing.assert_close(last_step(kept), last_step(other), atol=1e-5, rtol=0)
        assert (last_step(kept) - before).abs().max() > 1e-2
        for layer in kept.model.layers:  # only the scales change: weight bytes untouched
            layer.self_attn.kv_b_proj.weight_scale_inv.mul_(2.0)
        full = kept(ids, attn_impl="plain").logits[:, 8:]  # the plain path dequantizes on use
        torch.testing.assert_close(last_step(kept), full, atol=1e-4, rtol=0)
