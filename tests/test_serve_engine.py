"""The serving engine against the reference `moeco.generate`, token for token (fp32, greedy).

The model has sharp attention (helpers.sharp_attention) so a wrong slot, block table, mask or
position changes the tokens; blocks are 4 tokens so every sequence spans many of them.
"""

import pytest
import torch

import moeco
from helpers import micro_config, sharp_attention
from moeco.generate import generate
from moeco.serve import LLM, RequestError, SamplingParams
from moeco.serve.engine import EngineConfig, LLMEngine

BLOCK = 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(21)
    return sharp_attention(moeco.Transformer(micro_config(max_position_embeddings=96)), seed=21).eval()


def _engine(model, **kw):
    opts = dict(block_size=BLOCK, max_num_seqs=8, max_num_batched_tokens=24, cache_bytes=None, device="cpu")
    opts.update(kw)
    if opts["cache_bytes"] is None:
        opts["cache_bytes"] = 4096 * model.config.kv_cache_bytes_per_token(4)
    return LLMEngine(EngineConfig(**opts), model=model)


def _prompts(n, V, seed=0, shared=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(1, 30, (1,), generator=g))
        p = torch.randint(0, V, (length,), generator=g).tolist()
        if shared is not None and i % 3 == 0:
            p = shared + p
        out.append(p)
    return out


def _reference(model, prompts, max_tokens):
    return [generate(model, [p], mt)[0][len(p):] for p, mt in zip(prompts, max_tokens)]


def _run(engine, prompts, max_tokens, arrive_every=2):
    """Submit one prompt every `arrive_every` steps; return each request's tokens."""
    out, pending, rids, step = {}, list(enumerate(prompts)), {}, 0
    while pending or engine.has_unfinished():
        if pending and step % arrive_every == 0:
            i, p = pending.pop(0)
            rids[engine.add_request(p, SamplingParams(max_tokens=max_tokens[i], ignore_eos=True))] = i
        for o in engine.step():
            out.setdefault(rids[o.request_id], []).extend(o.new_token_ids)
        step += 1
    return [out[i] for i in range(len(prompts))]


def test_engine_equals_generate_with_chunking_prefix_sharing_and_preemption(model):
    V = model.config.vocab_size
    shared = torch.randint(0, V, (13,), generator=torch.Generator().manual_seed(5)).tolist()
    prompts = _prompts(22, V, seed=1, shared=shared)
    max_tokens = [3 + (7 * i) % 11 for i in range(len(prompts))]
    want = _reference(model, prompts, max_tokens)
    # a pool of 30 blocks (120 tokens) for 8 running sequences of up to ~55 tokens forces preemption
    engine = _engine(model, cache_bytes=30 * BLOCK * model.config.kv_cache_bytes_per_token(4))
    got = _run(engine, prompts, max_tokens)
    assert got == want
    s = engine.stats()
    assert s["num_preemptions"] > 0 and s["prefix_cache_hit_rate"] > 0  # the paths under test did run
    assert s["free_blocks"] == s["total_blocks"] and s["running"] == s["waiting"] == 0


def test_prefix_hit_gives_the_same_tokens_and_is_counted(model):
    V = model.config.vocab_size
    prompt = torch.randint(0, V, (19,), generator=torch.Generator().manual_seed(9)).tolist()
    engine = _engine(model)
    first = _run(engine, [prompt], [8])
    assert engine.blocks.hit_blocks == 0
    second = _run(engine, [prompt], [8])
    assert first == second == _reference(model, [prompt], [8])
    assert engine.blocks.hit_blocks == 4  # 19 prompt tokens: 4 full blocks of 4 reused
    whole = prompt[:16]  # a prompt of whole blocks (the first 16 of the last): its last block is recomputed, never written while shared
    a, b = _run(engine, [whole], [5]), _run(engine, [whole], [5])
    assert a == b == _reference(model, [whole], [5]) and engine.blocks.hit_blocks == 4 + 3 + 3


def test_paged_absorbed_decode_equals_dense_plain_for_random_block_tables(model):
    """Rows at different positions, their latents scattered over a shuffled pool."""
    from moeco.serve.cache import PagedLatentCache

    cfg = model.config
    g = torch.Generator().manual_seed(3)
    lens = [5, 17, 11]
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lens]
    perm = torch.randperm(40, generator=g).tolist()
    tables, k = [], 0
    for n in lens:
        nb = -(-n // BLOCK)
        tables.append(perm[k:k + nb])
        k += nb
    cache = PagedLatentCache(cfg, cfg.num_hidden_layers, 40, BLOCK, torch.float32, "cpu")
    width = max(map(len, tables))
    cache.block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    S = max(lens)
    ids = torch.zeros(3, S, dtype=torch.long)
    pos = torch.full((3, S), -1)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = s
        pos[b, : len(s)] = torch.arange(len(s))
    slot = cache.block_tables.gather(1, pos.clamp(min=0) // BLOCK) * BLOCK + pos.clamp(min=0) % BLOCK
    with torch.no_grad():
        # prefill all but each row's last token, then decode the last tokens in one absorbed step
        pre = pos.clone()
        for b, n in enumerate(lens):
            pre[b, n - 1] = -1
        cache.slot_mapping = torch.where(pre >= 0, slot, cache.scratch_slot)
        model(ids, pre, cache=cache, attn_impl="plain")
        last = torch.tensor([[n - 1] for n in lens])
        cache.slot_mapping = slot.gather(1, last)
        step = model(ids.gather(1, last), last, cache=cache, attn_impl="absorbed").logits[:, 0]
        want = torch.stack([model(s[None]).logits[0, -1] for s in seqs])
    torch.testing.assert_close(step, want, atol=1e-5, rtol=0)


def test_bad_requests_fail_alone_and_every_block_comes_back(model):
    engine = _engine(model, cache_bytes=40 * BLOCK * model.config.kv_cache_bytes_per_token(4), max_model_len=64)
    V = model.config.vocab_size
    good = _prompts(6, V, seed=4)
    cases = [([1] * 64, SamplingParams(), "prompt"), ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
             ([1, 2], SamplingParams(stop_token_ids=[V + 5]), "stop_token_ids"), ([], SamplingParams(), "prompt"),
             ([1, V + 1], SamplingParams(), "prompt"), ([1, 2], SamplingParams(temperature=-1), "temperature"),
             ([1, 2], SamplingParams(top_p=2.0), "top_p")]
    rids = [engine.add_request(p, SamplingParams(max_tokens=6, ignore_eos=True)) for p in good]
    for prompt, params, field in cases:
        with pytest.raises(RequestError) as err:
            engine.add_request(prompt, params)
        assert err.value.field == field and "\n" not in str(err.value)
    small = _engine(model, cache_bytes=6 * BLOCK * model.config.kv_cache_bytes_per_token(4))
    with pytest.raises(RequestError, match="cannot fit the latent cache"):
        small.add_request([1] * 10, SamplingParams(max_tokens=40))
    engine.step()
    engine.abort(rids[1])
    engine.step()
    engine.abort(rids[4])
    out = {}
    while engine.has_unfinished():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    want = _reference(model, good, [6] * 6)
    for i in (0, 2, 3, 5):
        assert len(out[rids[i]]) <= 6 and want[i][-len(out[rids[i]]):] == out[rids[i]]
    s = engine.stats()
    assert s["free_blocks"] == s["total_blocks"]


def test_stop_conditions_and_the_offline_llm(model):
    llm = LLM(model=model, block_size=BLOCK, device="cpu", cache_bytes=1 << 20)
    prompts = _prompts(5, model.config.vocab_size, seed=7)
    free = llm.generate(prompts, SamplingParams(max_tokens=10, ignore_eos=True))
    assert [c.token_ids for c in free] == _reference(model, prompts, [10] * 5)
    assert all(c.finish_reason == "length" for c in free)
    stop = free[0].token_ids[3]
    cut = llm.generate(prompts[0], SamplingParams(max_tokens=10, stop_token_ids=[stop], ignore_eos=True))[0]
    assert cut.token_ids == free[0].token_ids[: free[0].token_ids.index(stop) + 1] and cut.finish_reason == "stop"


def test_seeded_sampling_does_not_depend_on_the_batch(model):
    llm = LLM(model=model, block_size=BLOCK, device="cpu", cache_bytes=1 << 20)
    prompts = _prompts(4, model.config.vocab_size, seed=8)
    params = SamplingParams(max_tokens=8, temperature=1.0, top_k=20, seed=123, ignore_eos=True)
    alone = llm.generate(prompts[2], params)[0].token_ids
    together = llm.generate(prompts, [SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)] * 2
                            + [params] + [SamplingParams(max_tokens=8, temperature=0.7, ignore_eos=True)])
    assert together[2].token_ids == alone


@pytest.mark.slow  # a torch.compile of the decode step: ~30 s on 2 cores
def test_compiled_decode_gives_the_same_tokens(model):
    prompts = _prompts(6, model.config.vocab_size, seed=11)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    plain = LLM(model=model, block_size=BLOCK, device="cpu", cache_bytes=1 << 20).generate(prompts, params)
    compiled = LLM(model=model, block_size=BLOCK, device="cpu", cache_bytes=1 << 20, compile=True).generate(prompts, params)
    assert [c.token_ids for c in compiled] == [c.token_ids for c in plain]


def test_bench_throughput_cli_reports(tmp_path, capsys):
    import json

    from moeco.cli import main

    out = tmp_path / "r.json"
    assert main(["bench", "throughput", "--preset", "tiny", "--num-prompts", "6", "--input-len", "12",
                 "--output-len", "5", "--device", "cpu", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["num_requests"] == 6 and r["output_tokens_per_s"] > 0 and r["mean_tpot_ms"] > 0
    assert "output tokens/s" in capsys.readouterr().out
    assert main(["bench", "throughput", "--preset", "tiny", "--input-len", "0"]) == 2


def test_engine_serves_an_fp8_checkpoint_kept_in_fp8(tmp_path):
    """keep_fp8 (DeepSeek's release layout): on CPU the kept weights are dequantized on use, so the
    engine's greedy tokens equal the dequantized checkpoint's generate, token for token (fp32)."""
    cfg = micro_config(hidden_size=160, q_lora_rank=96, intermediate_size=200, moe_intermediate_size=72)
    torch.manual_seed(13)
    moeco.Transformer(cfg).save_pretrained(tmp_path / "fp8", fp8=True)
    deq = moeco.load_pretrained(tmp_path / "fp8", dtype=torch.float32)
    llm = LLM(str(tmp_path / "fp8"), keep_fp8=True, dtype="float32", device="cpu", block_size=BLOCK,
              cache_bytes=1 << 20)
    from moeco.fp8.inference import Fp8InferenceExperts

    assert isinstance(llm.engine.model.model.layers[1].mlp.experts, Fp8InferenceExperts)
    prompts = _prompts(4, cfg.vocab_size, seed=3)
    got = llm.generate(prompts, SamplingParams(max_tokens=6, ignore_eos=True))
    assert [c.token_ids for c in got] == _reference(deq, prompts, [6] * 4)
