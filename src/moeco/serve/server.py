"""`moeco serve`: an OpenAI-compatible HTTP server over the serving engine.

    POST /v1/completions        prompt (text, token ids, or a list of either) -> text, streamed or not
    POST /v1/chat/completions   messages -> chat template -> prompt -> text, streamed or not
    GET  /v1/models             the one model served
    GET  /health                200 while the engine thread is alive
    GET  /metrics               Prometheus text (moeco.serve.metrics)

Why FastAPI + uvicorn: the OpenAI-compatible servers people already run (vLLM, SGLang) use the
same stack, it streams Server-Sent Events without extra code, and uvicorn drains connections on
SIGTERM. Request bodies are parsed and validated by moeco.serve.openai_protocol rather than by
FastAPI's automatic models, so every bad request gets OpenAI's error body (status 400/401/404/413/
503, the field named) and never FastAPI's 422 or a 500.

Streaming (`"stream": true`): one `data: {chunk}` event per engine step that produced text, a
final chunk with `finish_reason`, optionally a usage chunk (`stream_options.include_usage`), then
`data: [DONE]`. A client that disconnects cancels its response; the response's cleanup aborts its
engine requests, which returns their cache blocks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from moeco.serve.async_engine import AsyncEngine
from moeco.chat_template import ChatTemplate, ChatTemplateError
from moeco.serve.generation import Generation
from moeco.serve.metrics import CONTENT_TYPE, ServerMetrics
from moeco.serve.openai_protocol import APIError, ChatCompletionRequest, CompletionRequest, parse

log = logging.getLogger("moeco.serve")
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass
class ServerState:
    engine: AsyncEngine
    model_name: str
    tokenizer: object  # tokenizers.Tokenizer or None
    chat_template: ChatTemplate
    max_model_len: int
    metrics: ServerMetrics
    api_key: str | None = None
    created: int = 0


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, before the app reads them into memory."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            while (await receive()).get("more_body"):  # drain it so the client reads our answer
                pass
            err = APIError(413, f"the request body has {int(length):,} bytes; the limit is {self.max_bytes:,}",
                           None, "request_too_large")
            return await JSONResponse(err.body(), 413)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise APIError(413, f"the request body is over the limit of {self.max_bytes:,} bytes", None,
                               "request_too_large")
            return message

        return await self.app(scope, limited, send)


def build_app(state: ServerState, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        state.engine.start()
        yield
        state.engine.shutdown()

    app = FastAPI(title="moeco serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    state.created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), exc.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):
        return JSONResponse(APIError(exc.status_code, str(exc.detail), None, None).body(), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return JSONResponse(APIError(400, "invalid request", None, "invalid_value").body(), 400)

    @app.exception_handler(Exception)
    async def _bug(request, exc):  # a bug: log it here, tell the client without a traceback
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(APIError(500, "internal server error", None, None).body(), 500)

    def authorize(request: Request) -> None:
        if state.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), state.api_key.encode()):
            raise APIError(401, "missing or incorrect API key; send 'Authorization: Bearer KEY'", None,
                           "invalid_api_key")

    async def read_json(request: Request):
        authorize(request)
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the request body is not valid JSON ({exc})", None, "invalid_json") from None

    def check_model(name: str) -> None:
        if name != state.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {state.model_name!r}",
                           "model", "model_not_found")

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "moeco",
                "root": state.model_name, "max_model_len": state.max_model_len}

    @app.get("/health")
    async def health():
        if state.engine.draining or not state.engine.is_alive():
            return JSONResponse({"status": "shutting down" if state.engine.draining else "engine stopped"}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str, request: Request):
        authorize(request)
        check_model(model)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await read_json(request))
        check_model(req.model)
        prompts = [await _encode(state, p, add_special_tokens=True) if isinstance(p, str) else p
                   for p in req.prompts()]
        explicit = "max_tokens" in req.model_fields_set
        return await _respond(state, request, req, prompts, explicit, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = parse(ChatCompletionRequest, await read_json(request))
        check_model(req.model)
        try:
            text = state.chat_template.render(req.conversation(), req.add_generation_prompt)
        except ChatTemplateError as exc:
            raise APIError(400, str(exc), "messages", "invalid_value") from None
        ids = await _encode(state, text, add_special_tokens=False)  # the template places bos itself
        req.max_tokens = req.max_completion_tokens or req.max_tokens
        explicit = req.max_tokens is not None
        return await _respond(state, request, req, [ids], explicit, chat=True)

    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    return app


async def _encode(state: ServerState, text: str, add_special_tokens: bool) -> list[int]:
    tok = state.tokenizer
    if tok is None:
        raise APIError(400, "this model directory has no tokenizer.json; send the prompt as token ids", "prompt",
                       "invalid_value")
    if len(text) > 20_000:  # long texts tokenize off the event loop
        return await asyncio.to_thread(lambda: tok.encode(text, add_special_tokens=add_special_tokens).ids)
    return tok.encode(text, add_special_tokens=add_special_tokens).ids


def _max_tokens(state: ServerState, req, ids: list[int], explicit: bool, param: str) -> int:
    room = state.max_model_len - len(ids)
    if not ids:
        raise APIError(400, "the prompt is empty; send at least one token", param, "invalid_value")
    if room <= 0:
        raise APIError(400, f"this model's maximum context length is {state.max_model_len} tokens and the prompt "
                            f"has {len(ids)}; shorten it", param, "context_length_exceeded")
    if explicit and req.max_tokens > room:
        raise APIError(400, f"this model's maximum context length is {state.max_model_len} tokens; the prompt "
                            f"has {len(ids)} and max_tokens asks for {req.max_tokens} more; lower max_tokens",
                       "max_tokens", "context_length_exceeded")
    return min(req.max_tokens, room) if req.max_tokens else room


async def _respond(state: ServerState, request: Request, req, prompts: list[list[int]], explicit: bool,
                   chat: bool):
    param = "messages" if chat else "prompt"
    params = [[req.sampling_params(_max_tokens(state, req, ids, explicit, param), j) for j in range(req.n)]
              for ids in prompts]
    gen = await Generation.start(state.engine, state.tokenizer, prompts, params)
    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    head = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": state.model_name}
    if req.stream:
        usage = req.stream_options is not None and req.stream_options.include_usage
        return _SSEResponse(_stream(gen, head, chat, usage), gen)
    try:
        async for _ in gen.events(disconnected=request.is_disconnected):
            pass
    finally:
        gen.close()
    failed = [c for c in gen.choices if c.finish_reason == "error"]
    if failed:
        raise APIError(500, f"generation failed: {failed[0].error}", None, "engine_error")
    if chat:
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                    "finish_reason": c.finish_reason} for c in gen.choices]
    else:
        choices = [{"index": c.index, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
                   for c in gen.choices]
    return {**head, "choices": choices, "usage": gen.usage()}


class _SSEResponse(StreamingResponse):
    """A stream whose engine requests are aborted however it ends, even if it never starts."""

    def __init__(self, body, gen: Generation):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.gen = gen

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.gen.close()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"  # ASCII only: no U+2028 in a line


async def _stream(gen: Generation, head: dict, chat: bool, include_usage: bool):
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    extra = {"usage": None} if include_usage else {}
    if chat:  # OpenAI opens each choice with its role
        for c in gen.choices:
            yield _sse({**head, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                             "logprobs": None, "finish_reason": None}], **extra})
    async for c, text, reason in gen.events():
        if reason == "error":
            yield _sse(APIError(500, f"generation failed: {c.error}", None, "engine_error").body())
            continue
        if chat:
            choice = {"index": c.index, "delta": {"content": text} if text else {}, "logprobs": None,
                      "finish_reason": reason}
        else:
            choice = {"index": c.index, "text": text, "logprobs": None, "finish_reason": reason}
        yield _sse({**head, "choices": [choice], **extra})
    if include_usage:
        yield _sse({**head, "choices": [], "usage": gen.usage()})
    yield "data: [DONE]\n\n"
