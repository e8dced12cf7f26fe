"""`moeco serve` over HTTP: the official openai client, concurrency, disconnects, bad requests,
/metrics, and `moeco bench serve`, against a tiny random model served on a free loopback port.

One server process is started for the module (with an API key, so every test also exercises the
key check) and stopped after. Slow (`-m slow`): 64 concurrent streams against the offline engine,
and a server of its own that fills its queue and gets SIGTERM.
"""

import asyncio
import json
import threading
import time

import httpx
import pytest

from serve_http_helpers import MODEL_NAME, ServerProcess, build_checkpoint, metric, reference_text

openai = pytest.importorskip("openai")
KEY = "test-key-7f3a"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("serve_http") / "model")


@pytest.fixture(scope="module")
def server(model_dir):
    srv = ServerProcess(model_dir, "--api-key", KEY)
    yield srv
    code = srv.terminate()
    assert code == 0, srv.output()
    assert "Traceback" not in srv.output(), srv.output()


@pytest.fixture(scope="module")
def offline(model_dir):
    """The engine without the server: what each response must equal."""
    from moeco.serve import LLM

    return LLM(str(model_dir), device="cpu", cache_bytes=8 << 20)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0)


def _metrics(server) -> str:
    return httpx.get(server.base_url + "/metrics", timeout=10).text


def test_openai_client_models_completions_and_chat(client, offline):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    prompt = "The for statement is used to iterate"
    plain = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0)
    streamed = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    want = offline.generate([prompt], _params(12))[0]
    assert plain.choices[0].text == "".join(c.choices[0].text for c in streamed if c.choices) == want.text
    assert plain.choices[0].finish_reason == want.finish_reason
    assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == want.finish_reason
    n_prompt = len(offline.engine.tokenizer.encode(prompt).ids)
    assert plain.usage.prompt_tokens == streamed[-1].usage.prompt_tokens == n_prompt
    assert plain.usage.completion_tokens == streamed[-1].usage.completion_tokens == len(want.token_ids)
    assert plain.usage.total_tokens == n_prompt + len(want.token_ids)

    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is a list?"}]
    chat = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    rendered = "System: You are terse.\n\nUser: What is a list?\n\nAssistant:"  # the default template
    want = offline.generate([rendered], _params(10))[0]
    assert chat.choices[0].message.content == text == want.text
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(offline.engine.tokenizer.encode(rendered).ids)


def test_n_choices_stop_strings_and_seeds(client, offline):
    prompt = "A dictionary maps keys"
    greedy = offline.generate([prompt], _params(20))[0].text
    stop = greedy[5:8]  # a stop string the greedy output meets at character >= 5
    cut = greedy.index(stop)
    for stream in (False, True):
        out = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=20, temperature=0,
                                        stop=[stop], stream=stream)
        text = "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
        assert text == greedy[:cut]
    seeded = client.completions.create(model=MODEL_NAME, prompt=[prompt, "x = 1"], n=3, max_tokens=6,
                                       temperature=1.0, seed=11)
    again = client.completions.create(model=MODEL_NAME, prompt=[prompt, "x = 1"], n=3, max_tokens=6,
                                      temperature=1.0, seed=11)
    assert sorted(c.index for c in seeded.choices) == list(range(6))
    assert [c.text for c in seeded.choices] == [c.text for c in again.choices]  # seeds make it reproducible
    assert seeded.usage.completion_tokens <= 36


@pytest.mark.slow  # ~10-40 s on 2 cores
def test_64_concurrent_streams_all_finish_unmixed(server, offline):
    text = "\n".join(reference_text()[40:])
    prompts = [text[97 * i: 97 * i + 4 + (37 * i) % 120] for i in range(64)]
    max_tokens = [1 + (13 * i) % 24 for i in range(64)]
    want = offline.generate(prompts, [_params(m) for m in max_tokens])

    async def one(client, i):
        stream = await client.completions.create(model=MODEL_NAME, prompt=prompts[i], max_tokens=max_tokens[i],
                                                 temperature=0, stream=True, stream_options={"include_usage": True})
        pieces, usage = [], None
        async for chunk in stream:
            pieces += [c.text for c in chunk.choices]
            usage = chunk.usage or usage
        return "".join(pieces), usage.completion_tokens

    async def main():
        client = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key=KEY, max_retries=0, timeout=300)
        async with client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    got = asyncio.run(main())
    assert [g[0] for g in got] == [w.text for w in want]
    assert [g[1] for g in got] == [len(w.token_ids) for w in want]


def test_client_disconnect_mid_stream_frees_blocks(server):
    before = _metrics(server)
    aborted = metric(before, "moeco:request_success_total", finished_reason="abort")
    generated = metric(before, "moeco:generation_tokens_total", model_name=MODEL_NAME)
    body = {"model": MODEL_NAME, "prompt": "Exceptions are raised", "max_tokens": 2000, "ignore_eos": True,
            "temperature": 0, "stream": True}  # seconds of work: still running when the client leaves
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", server.base_url + "/v1/completions", json=body, headers=AUTH) as resp:
            assert resp.status_code == 200
            lines = resp.iter_lines()  # (breaking out of a for loop over it would close the connection)
            assert sum(next(lines).startswith("data:") for _ in range(6)) == 3
            m = _metrics(server)
            assert metric(m, "moeco:num_requests_running") == 1
            assert metric(m, "moeco:cache_free_blocks") < metric(m, "moeco:cache_total_blocks")  # it holds blocks
    deadline = time.time() + 30  # the connection is closed: the server must notice and abort
    while time.time() < deadline:
        m = _metrics(server)
        if metric(m, "moeco:request_success_total", finished_reason="abort") == aborted + 1:
            break
        time.sleep(0.2)
    assert metric(m, "moeco:request_success_total", finished_reason="abort") == aborted + 1
    assert metric(m, "moeco:generation_tokens_total", model_name=MODEL_NAME) - generated < 2000
    assert metric(m, "moeco:cache_free_blocks") == metric(m, "moeco:cache_total_blocks")
    assert metric(m, "moeco:num_requests_running") == 0 and metric(m, "moeco:num_requests_waiting") == 0
    # a non-streaming request whose client gives up: the server polls the connection and aborts too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.base_url + "/v1/completions", json={**body, "stream": False}, headers=AUTH, timeout=1.5)
    deadline = time.time() + 30
    while metric(m := _metrics(server), "moeco:request_success_total", finished_reason="abort") < aborted + 2:
        assert time.time() < deadline, "the abandoned non-streaming request was not aborted"
        time.sleep(0.2)
    assert metric(m, "moeco:cache_free_blocks") == metric(m, "moeco:cache_total_blocks")


BAD = [  # (body or raw bytes, headers, status, param)
    ({"prompt": "hi"}, AUTH, 400, "model"),
    ({"model": MODEL_NAME}, AUTH, 400, "prompt"),
    ({"model": MODEL_NAME, "prompt": 5}, AUTH, 400, "prompt"),
    ({"model": MODEL_NAME, "prompt": [1, "a"]}, AUTH, 400, "prompt"),
    ({"model": MODEL_NAME, "prompt": "hi", "max_tokens": "5"}, AUTH, 400, "max_tokens"),
    ({"model": MODEL_NAME, "prompt": "hi", "max_tokens": -3}, AUTH, 400, "max_tokens"),
    ({"model": MODEL_NAME, "prompt": "hi", "temperature": -1}, AUTH, 400, "temperature"),
    ({"model": MODEL_NAME, "prompt": "hi", "top_p": 0}, AUTH, 400, "top_p"),
    ({"model": MODEL_NAME, "prompt": "hi", "n": 0}, AUTH, 400, "n"),
    ({"model": MODEL_NAME, "prompt": "hi", "stop": [""]}, AUTH, 400, "stop"),
    ({"model": MODEL_NAME, "prompt": "hi", "stop_token_ids": [10**6]}, AUTH, 400, "stop_token_ids"),
    ({"model": MODEL_NAME, "prompt": "hi", "stream_options": {"include_usage": True}}, AUTH, 400, "stream_options"),
    ({"model": MODEL_NAME, "prompt": "hi", "logprobs": 2}, AUTH, 400, "logprobs"),
    ({"model": MODEL_NAME, "prompt": [7, 10**6]}, AUTH, 400, "prompt"),
    ({"model": MODEL_NAME, "prompt": "word " * 2500}, AUTH, 400, "prompt"),  # beyond the 2048-token context
    ({"model": MODEL_NAME, "prompt": "hi", "max_tokens": 5000}, AUTH, 400, "max_tokens"),
    ({"model": "gpt-4", "prompt": "hi"}, AUTH, 404, "model"),
    ({"model": MODEL_NAME, "prompt": "hi"}, {}, 401, None),
    ({"model": MODEL_NAME, "prompt": "hi"}, {"Authorization": "Bearer wrong"}, 401, None),
    (b"{not json", AUTH, 400, None),
    (b"[1, 2]", AUTH, 400, None),
    (json.dumps({"model": MODEL_NAME, "prompt": "a" * 10_000_000}).encode(), AUTH, 413, None),
]
BAD_CHAT = [
    ({"model": MODEL_NAME, "messages": []}, 400, "messages"),
    ({"model": MODEL_NAME, "messages": "hi"}, 400, "messages"),
    ({"model": MODEL_NAME, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content"),
    ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, client):
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        for body, headers, status, param in BAD:
            kw = {"content": body} if isinstance(body, bytes) else {"json": body}
            resp = http.post("/v1/completions", headers={**headers, "Content-Type": "application/json"}, **kw)
            _check_error(resp, status, param, body)
        for body, status, param in BAD_CHAT:
            _check_error(http.post("/v1/chat/completions", json=body, headers=AUTH), status, param, body)
        _check_error(http.get("/v1/models"), 401, None, "models without a key")
        _check_error(http.get("/v1/nothing", headers=AUTH), 404, None, "unknown route")
        _check_error(http.get("/v1/completions", headers=AUTH), 405, None, "wrong method")
        assert http.get("/health").status_code == 200  # open without the key
    ok = client.completions.create(model=MODEL_NAME, prompt="still here", max_tokens=3, temperature=0)
    assert ok.choices[0].finish_reason in ("length", "stop")
    assert "Traceback" not in server.output()


def _check_error(resp, status, param, what):
    assert resp.status_code == status, (what if not isinstance(what, bytes) else what[:60], resp.text[:300])
    err = resp.json()["error"]
    assert err["message"] and isinstance(err["type"], str), resp.text
    if param is not None:
        assert err["param"] == param, (what, resp.text)


def test_metrics_parse_and_move(server, client):
    before = _metrics(server)
    out = client.completions.create(model=MODEL_NAME, prompt="Metrics move", max_tokens=7, temperature=0,
                                    extra_body={"ignore_eos": True})
    after = _metrics(server)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("moeco:prompt_tokens_total", model_name=MODEL_NAME) == out.usage.prompt_tokens
    assert delta("moeco:generation_tokens_total", model_name=MODEL_NAME) == 7 == out.usage.completion_tokens
    assert delta("moeco:request_success_total", finished_reason="length") == 1
    for h in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert delta(f"moeco:{h}_count", model_name=MODEL_NAME) == 1
        assert delta(f"moeco:{h}_sum", model_name=MODEL_NAME) > 0
    assert 0 <= metric(after, "moeco:cache_usage_perc") <= 1
    assert metric(after, "moeco:num_requests_running") == 0


def test_bench_serve_reports(server, tmp_path, capsys):
    from moeco.cli import main

    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    code = main(["bench", "serve", "--base-url", server.base_url, "--api-key", KEY, "--num-prompts", "12",
                 "--input-len", "16", "--output-len", "6", "--max-concurrency", "4", "--slo-ttft-ms", "60000",
                 "--slo-tpot-ms", "60000", "--json", str(out), "--plot", str(png)])
    assert code == 0
    report = capsys.readouterr().out
    for line in ("Successful requests:", "Mean TTFT (ms):", "P99 TPOT (ms):", "Median ITL (ms):",
                 "Request goodput (req/s):"):
        assert line in report
    res = json.loads(out.read_text())
    assert res["completed"] == 12 and res["failed"] == 0 and res["model"] == MODEL_NAME
    assert res["total_input_tokens"] == 12 * 16 and res["total_output_tokens"] == 12 * 6
    assert res["request_goodput"] == pytest.approx(res["request_throughput"])  # generous SLOs: all good
    assert 0 < res["median_ttft_ms"] <= res["p99_ttft_ms"] and res["mean_tpot_ms"] > 0
    assert png.stat().st_size > 10_000


@pytest.mark.slow
def test_queue_full_503_then_sigterm_aborts_in_flight_and_exits_0(model_dir):
    srv = ServerProcess(model_dir, "--max-num-seqs", "1", "--max-queued-requests", "1", "--grace-period", "2")
    body = {"model": MODEL_NAME, "prompt": "long", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    ends = []

    def stream():
        try:
            with httpx.stream("POST", srv.base_url + "/v1/completions", json=body, timeout=120) as resp:
                ends.append([line for line in resp.iter_lines() if line])
        except httpx.HTTPError as exc:
            ends.append([repr(exc)])

    try:
        threads = [threading.Thread(target=stream) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.time() + 30
        while metric(_metrics(srv), "moeco:num_requests_running") + metric(_metrics(srv), "moeco:num_requests_waiting") < 2:
            assert time.time() < deadline
            time.sleep(0.1)
        third = httpx.post(srv.base_url + "/v1/completions", json={**body, "stream": False}, timeout=30)
        assert third.status_code == 503 and third.json()["error"]["code"] == "overloaded"
        start = time.time()
        assert srv.terminate(timeout=60) == 0, srv.output()
        assert time.time() - start < 15  # the 2 s grace period, then the aborts, not 2 x 2000 tokens
        for t in threads:
            t.join(30)
        assert len(ends) == 2, ends
        for lines in ends:  # each stream ended cleanly, cut short by the grace period
            assert lines[-1] == "data: [DONE]", lines[-3:]
            assert json.loads(lines[-2][5:])["choices"][0]["finish_reason"] == "abort"
            assert len(lines) < 1500
        assert "Traceback" not in srv.output(), srv.output()
    finally:
        srv.stop()


def _params(max_tokens):
    from moeco.serve import SamplingParams

    return SamplingParams(max_tokens=max_tokens)
