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


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Many tiny ops: on a busy 2-core machine two torch threads make them ~15x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# ---- the deployment: `moeco serve --disaggregate` on loopback ---------------------------------------
def _disagg_server(model_dir, *extra):
    from serve_http_helpers import ServerProcess

    return ServerProcess(model_dir, "--disaggregate", *extra)


def _scrape(base_url) -> dict:
    """{(name, role): value} for the router's per-worker series, plus 'url:<role>'."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for fam in text_string_to_metric_families(httpx.get(base_url + "/metrics", timeout=10).text):
        for s in fam.samples:
            if "role" in s.labels:
                out[(s.name, s.labels["role"])] = s.value
                out[f"url:{s.labels['role']}"] = s.labels["url"]
    return out


def _wait_full(base_url, timeout=20.0):
    """Both workers' pools back to full (their engines' own stats)."""
    import time

    import httpx

    m = _scrape(base_url)
    deadline = time.time() + timeout
    while True:
        stats = [httpx.get(m[f"url:{r}"] + "/info", timeout=5).json()["stats"] for r in ("prefill", "decode")]
        if all(s["free_blocks"] == s["total_blocks"] and s["pending_transfers"] == 0 for s in stats):
            return
        assert time.time() < deadline, stats
        time.sleep(0.2)


async def _complete(client, prompt, max_tokens, stream=False):
    body = {"model": "tiny-test", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True}
    r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from serve_http_helpers import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("serve_disagg") / "model")


@pytest.mark.slow
def test_deployment_equals_colocated(model_dir):
    """32 mixed-length greedy requests at once through router -> prefill -> decode, then 8 that share
    a 140-token prefix (two 64-token blocks hit on the decode side): the colocated engine's text."""
    import asyncio

    import httpx

    from moeco.serve import LLM

    rng = random.Random(0)
    prompts = [[rng.randrange(320) for _ in range(rng.choice([1, 5, 20, 63, 64, 65, 130]))] for _ in range(32)]
    lengths = [rng.choice([1, 4, 16]) for _ in range(32)]
    head = [rng.randrange(320) for _ in range(140)]
    shared = [head + [rng.randrange(320) for _ in range(rng.choice([1, 9]))] for _ in range(8)]
    offline = LLM(str(model_dir), device="cpu", cache_bytes=8 << 20)
    want = [c.text for c in offline.generate(prompts + shared, [SamplingParams(max_tokens=n, ignore_eos=True)
                                                                for n in lengths + [6] * 8])]
    srv = _disagg_server(model_dir)
    try:
        async def run():
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as client:
                first = await asyncio.gather(*(_complete(client, p, n) for p, n in zip(prompts, lengths)))
                second = [await _complete(client, shared[0], 6)]  # the prefix lands on the decode side
                second += await asyncio.gather(*(_complete(client, p, 6) for p in shared[1:]))
                return first + second

        got = asyncio.run(run())
        assert got == want
        bad = httpx.post(srv.base_url + "/v1/completions", json={"model": "tiny-test", "prompt": [1, 10**6]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt", bad.text
        from serve_http_helpers import metric

        text = httpx.get(srv.base_url + "/metrics").text
        assert metric(text, "moeco:request_success_total", finished_reason="length") == 40
        assert metric(text, "moeco:generation_tokens_total") == sum(lengths) + 6 * 8
        m = _scrape(srv.base_url)
        from moeco.config import ModelConfig

        per_token = ModelConfig.from_hf(model_dir).kv_cache_bytes_per_token(4)  # fp32 cache on CPU
        sent_tokens = m[("moeco:disagg_transfer_tokens_total", "prefill")]
        assert m[("moeco:disagg_transfer_bytes_total", "prefill")] == sent_tokens * per_token
        assert sent_tokens <= sum(map(len, prompts + shared)) - 7 * 128  # 7 requests skipped 2 blocks each
        _wait_full(srv.base_url)
    finally:
        srv.stop()


def _worker_pid(base_url, role) -> int:
    import httpx

    return int(httpx.get(_scrape(base_url)[f"url:{role}"] + "/info", timeout=5).json()["id"].split("-")[1])


def _until_served(client, deadline_s=120.0):
    """Retry a small request until it succeeds (a restarted worker has rejoined); returns the seconds taken."""
    import time

    t0 = time.time()
    while True:
        r = client.post("/v1/completions", json={"model": "tiny-test", "prompt": [1, 2, 3], "max_tokens": 3})
        if r.status_code == 200:
            return time.time() - t0
        assert r.status_code == 503 and time.time() - t0 < deadline_s, (r.status_code, r.text)
        time.sleep(0.5)


@pytest.mark.slow
def test_worker_killed_mid_stream(model_dir):
    """SIGKILL the decode worker while 4 requests stream: each ends with an error event within the
    timeout, the launcher restarts the worker, new requests succeed, no blocks leak. Then the same
    for the prefill worker, killed just before a request arrives."""
    import asyncio
    import json
    import os
    import signal
    import time

    import httpx

    timeout = 10
    srv = _disagg_server(model_dir, "--request-timeout", str(timeout), "--transfer-timeout", str(timeout))
    try:
        pid = _worker_pid(srv.base_url, "decode")

        async def stream(client, started):
            body = {"model": "tiny-test", "prompt": list(range(10)), "max_tokens": 1500, "ignore_eos": True,
                    "stream": True}
            events = []
            async with client.stream("POST", "/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events.append(line[6:])
                        started.set()
            return events, time.time()

        async def run():
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as client:
                flags = [asyncio.Event() for _ in range(4)]
                tasks = [asyncio.create_task(stream(client, f)) for f in flags]
                await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flags)), 60)
                os.kill(pid, signal.SIGKILL)
                killed = time.time()
                return await asyncio.wait_for(asyncio.gather(*tasks), timeout + 20), killed

        results, killed = asyncio.run(run())
        for events, ended in results:
            assert events[-1] == "[DONE]"
            errors = [json.loads(e) for e in events[:-1] if "error" in json.loads(e)]
            assert errors and "decode worker" in errors[0]["error"]["message"], events[-3:]
            assert ended - killed < timeout
        with httpx.Client(base_url=srv.base_url, timeout=60) as client:
            _until_served(client)
            assert _worker_pid(srv.base_url, "decode") != pid
            _wait_full(srv.base_url)

            pid = _worker_pid(srv.base_url, "prefill")
            os.kill(pid, signal.SIGKILL)
            t0 = time.time()
            r = client.post("/v1/completions", json={"model": "tiny-test", "prompt": [5, 6, 7], "max_tokens": 3})
            assert r.status_code in (500, 503) and time.time() - t0 < timeout, r.text
            _until_served(client)
            _wait_full(srv.base_url, timeout=timeout + 10)  # the decode side's orphaned receive times out
    finally:
        srv.stop()


def test_router_picks_by_load_and_reports_per_worker():
    from moeco.serve.async_engine import Overloaded
    from moeco.serve.disagg.router import Router

    r = Router(["http://p0"], ["http://d0", "http://d1"])
    with pytest.raises(Overloaded, match="no decode worker is up"):
        r._pick("decode")
    p0, d0, d1 = r.workers
    for w, free in ((p0, 10), (d0, 5), (d1, 9)):
        w.up, w.stats = True, {"running": 1, "waiting": 2, "free_blocks": free, "total_blocks": 10}
    assert r._pick("decode") is d1  # same load: more free blocks
    d1.in_flight = 3
    assert r._pick("decode") is d0  # fewer requests in flight first
    s = r.stats()
    assert (s["running"], s["waiting"], s["free_blocks"], s["total_blocks"]) == (3, 6, 14, 20)
    d0.transfer_bytes = 1234
    fams = {f.name: f for f in r.collect()}
    got = {tuple(x.labels.values()): x.value for x in fams["moeco:disagg_transfer_bytes"].samples}
    assert got[("decode", "http://d0")] == 1234 and fams["moeco:disagg_worker_up"].samples[0].value == 1.0


@pytest.mark.slow
def test_deployment_waits_for_decode_blocks(model_dir):
    """A decode pool of 4 blocks and 6 concurrent requests of 2 blocks each: the ones that do not fit
    wait for blocks (heartbeats keep the router's read alive) instead of failing, and all match."""
    import asyncio

    import httpx

    from moeco.config import ModelConfig
    from moeco.serve import LLM

    cache = 4 * 64 * ModelConfig.from_hf(model_dir).kv_cache_bytes_per_token(4)
    rng = random.Random(3)
    prompts = [[rng.randrange(320) for _ in range(70)] for _ in range(6)]
    want = [c.text for c in LLM(str(model_dir), device="cpu", cache_bytes=cache).generate(
        prompts, SamplingParams(max_tokens=40, ignore_eos=True))]
    srv = _disagg_server(model_dir, "--cache-bytes", str(cache))
    try:
        async def run():
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=120) as client:
                return await asyncio.gather(*(_complete(client, p, 40) for p in prompts))

        assert asyncio.run(run()) == want
        _wait_full(srv.base_url)
    finally:
        srv.stop()
