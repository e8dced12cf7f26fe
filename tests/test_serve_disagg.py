"""Prefill/decode disaggregation.

Fast: the engine's hand-over (prefill-only export on one engine, import on another, in one process)
gives the colocated engine's greedy tokens, with and without decode-side prefix hits, sends exactly
the latent per token, and leaves both pools full. Slow: the deployment itself (`moeco serve
--disaggregate`: a prefill and a decode worker process, the router in front), compared token for
token with the colocated engine, and a decode worker killed mid-stream.
"""

import random

import pytest
import torch

import moeco
from helpers import micro_config
from moeco.serve.engine import EngineConfig, LLMEngine
from moeco.serve.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return moeco.Transformer(micro_config()).eval()


def _engine(model, **kw):
    return LLMEngine(EngineConfig(device="cpu", block_size=8, cache_bytes=kw.pop("cache_bytes", 1 << 20), **kw),
                     model=model)


def _colocated(model, prompts, params, eng=None):
    eng = eng or _engine(model)
    ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
    out = {i: [] for i in ids}
    while eng.has_unfinished():
        for o in eng.step():
            out[o.request_id] += o.new_token_ids
    return [out[i] for i in ids]


def _handover(pre, dec, prompts, params):
    """Every prompt prefilled on `pre`, its rows moved to `dec`, decoded there. Returns outputs and bytes sent."""
    out, sent, tokens_sent = {}, 0, 0
    for i, (p, sp) in enumerate(zip(prompts, params)):
        rid = f"r{i}"
        skip = dec.reserve_import(p, sp, rid)
        assert skip is not None
        pre.add_request(p, sp, rid, prefill_only=True)
        while rid not in pre.exports:
            pre.step()
        state, rows = pre.export_prompt(rid, skip)
        assert rows.dtype == torch.uint8 and rows.numel() == dec.import_bytes(rid)
        sent, tokens_sent = sent + rows.numel(), tokens_sent + len(p) - skip
        pre.release_export(rid)
        first = dec.complete_import(rid, state, rows.clone())
        out[rid] = list(first.new_token_ids)
        if i % 3 == 2:  # decode a few steps between arrivals: requests join a running batch
            for o in dec.step():
                out[o.request_id] += o.new_token_ids
    while dec.has_unfinished():
        for o in dec.step():
            out[o.request_id] += o.new_token_ids
    return [out[f"r{i}"] for i in range(len(prompts))], sent, tokens_sent


def _mixed(n, shared_prefix=0, seed=0):
    rng = random.Random(seed)
    head = [rng.randrange(256) for _ in range(shared_prefix)]
    prompts = [head + [rng.randrange(256) for _ in range(rng.choice([1, 3, 7, 8, 9, 17, 30]))] for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.choice([1, 2, 5, 9]), ignore_eos=True) for _ in range(n)]
    return prompts, params


@pytest.mark.parametrize("shared_prefix", [0, 20])
def test_handover_equals_colocated(model, shared_prefix):
    prompts, params = _mixed(32, shared_prefix)
    want = _colocated(model, prompts, params)
    pre, dec = _engine(model), _engine(model)
    got, sent, tokens_sent = _handover(pre, dec, prompts, params)
    assert got == want
    per_token = model.config.kv_cache_bytes_per_token(4)  # fp32 cache
    assert sent == tokens_sent * per_token and dec.cache.bytes_per_token() == per_token
    if shared_prefix:  # the shared 16 tokens (two 8-token blocks) are sent once, then hit on the decode side
        assert tokens_sent <= sum(map(len, prompts)) - 31 * 16 and dec.blocks.hit_blocks >= 31 * 2
    for eng in (pre, dec):
        assert eng.blocks.num_free == eng.blocks.num_blocks and not eng.exports and not eng.imports


def test_handover_with_mtp(model):
    """The MTP layer's rows travel too (one more pool layer), and the pending draft with them."""
    prompts, params = _mixed(6, seed=1)
    eng = lambda: LLMEngine(EngineConfig(device="cpu", block_size=8, cache_bytes=1 << 20, speculative="mtp"),
                            model=model)
    pre, dec = eng(), eng()
    got, sent, tokens_sent = _handover(pre, dec, prompts, params)
    assert got == _colocated(model, prompts, params, eng())
    assert sent == tokens_sent * model.config.latent_dim * (model.config.num_hidden_layers + 1) * 4
    assert dec.spec.proposed > 0


def test_handover_seeded_sampling(model):
    """The sampler's generator state travels, so a seeded request samples what it would colocated."""
    prompts, _ = _mixed(4, seed=2)
    params = [SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.9, seed=i) for i in range(4)]
    got, _, _ = _handover(_engine(model), _engine(model), prompts, params)
    assert got == _colocated(model, prompts, params)


def test_import_abort_and_no_room(model):
    dec = _engine(model, cache_bytes=3 * 8 * 3 * 24 * 4)  # 3 blocks of 8 tokens (3 layers, latent 24, fp32)
    total = dec.blocks.num_blocks
    assert dec.reserve_import(list(range(10)), SamplingParams(max_tokens=2), "a") == 0
    assert dec.blocks.num_free == total - 2
    assert dec.reserve_import(list(range(20)), SamplingParams(max_tokens=2), "b") is None  # no room now
    dec.abort("a")
    assert dec.blocks.num_free == total and not dec.imports
