"""A prefill or a decode worker: one engine, one cache pool, a small HTTP control API for the router.

    GET  /health, /info           liveness; role, id (new at every start), engine stats, bytes per token
    POST /prefill   (prefill)     {request_id, prompt, params, pair, store, tag, skip_tokens}
                                  -> prefill only, send the rows past skip_tokens and the first token to
                                  the decode worker, release the blocks; answers {bytes, tokens, seconds}
    POST /generate  (decode)      {request_id, prompt, params, pair, store, tag}
                                  -> newline-delimited JSON: {"skip_tokens": k} once the blocks are
                                  reserved (k prompt tokens hit the prefix cache), then, once the rows
                                  arrived, {"tokens": [...], "finished": .., "reason": .., "error": ..}
                                  per engine step; a first line {"error", "field", "status"} instead
                                  when the request is refused, and {"waiting": true} every 2 s while it
                                  waits (for blocks or rows). Closing the stream aborts the request.
    POST /abort/{request_id}

The control API has no key: a worker binds 127.0.0.1 unless told otherwise; put only the router on
a public address. Why HTTP for control: the router already speaks HTTP and streams, a dead worker shows up as a broken
connection on every request it held (that is the error path), and the data itself goes over
torch.distributed (moeco.serve.disagg.transfer), never through JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from moeco.serve.async_engine import AsyncEngine, EngineFailure
from moeco.serve.disagg.transfer import Transfer
from moeco.serve.sampling_params import RequestError, SamplingParams

log = logging.getLogger("moeco.serve.disagg")
HEARTBEAT_S = 2.0  # a {"waiting": true} line this often while a request waits for blocks or its rows


def _line(obj) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def build_worker_app(role: str, engine: AsyncEngine, transfer: Transfer, timeout_s: float) -> FastAPI:
    assert role in ("prefill", "decode")
    worker_id = f"{role}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    llm = engine.engine
    bytes_per_token = llm.cache.bytes_per_token()
    state_bytes = torch.Generator(device=llm.device).get_state().numel()
    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.shutdown()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    async def health():
        return {"status": "ok"} if engine.is_alive() else JSONResponse({"status": "engine stopped"}, 503)

    @app.get("/info")
    async def info():
        return {"role": role, "id": worker_id, "stats": engine.stats(), "bytes_per_token": bytes_per_token}

    @app.post("/abort/{rid}")
    async def abort(rid: str):
        engine.abort(rid)
        return {"ok": True}

    @app.post("/prefill")
    async def prefill(request: Request):
        body = await request.json()
        rid, prompt, skip = body["request_id"], body["prompt"], body["skip_tokens"]
        params = SamplingParams(**body["params"])
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def add(e):
            e.add_request(prompt, params, rid, prefill_only=True)
            engine.watch(rid, queue, loop, len(prompt))

        try:
            await engine.call(add)
        except RequestError as exc:
            return JSONResponse({"error": str(exc), "field": exc.field}, 400)
        try:
            out = await asyncio.wait_for(queue.get(), timeout_s)
        except asyncio.TimeoutError:
            engine.abort(rid)
            return JSONResponse({"error": f"prefill took over {timeout_s:g} s"}, 504)
        if isinstance(out, EngineFailure) or out.finish_reason != "prefilled":
            engine.abort(rid)
            return JSONResponse({"error": f"prefill failed: {getattr(out, 'message', out.error)}"}, 500)
        try:
            state, rows = await engine.call(lambda e: e.export_prompt(rid, skip))
            t0 = time.perf_counter()
            await loop.run_in_executor(transfer.pool, transfer.send, body["store"], body["pair"], body["tag"],
                                       state, rows)
            seconds = time.perf_counter() - t0
        except Exception as exc:
            log.warning("hand-over of %s failed: %s", rid, exc)
            return JSONResponse({"error": f"hand-over to the decode worker failed ({exc})"}, 502)
        finally:
            await engine.call(lambda e: e.release_export(rid))
        return {"bytes": rows.numel(), "tokens": len(prompt) - skip, "seconds": seconds,
                "bytes_per_token": bytes_per_token}

    @app.post("/generate")
    async def generate(request: Request):
        body = await request.json()
        rid, prompt = body["request_id"], body["prompt"]
        try:
            params = SamplingParams(**body["params"])
        except TypeError as exc:
            return JSONResponse({"error": str(exc), "field": "params", "status": 400}, 400)
        return StreamingResponse(_decode_stream(rid, prompt, params, body), media_type="application/x-ndjson")

    async def _decode_stream(rid, prompt, params, body):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        next_beat = loop.time() + HEARTBEAT_S
        while True:  # reserve blocks, waiting while the pool is full
            try:
                reserved = await engine.call(lambda e: (lambda k: None if k is None else (k, e.import_bytes(rid)))(
                    e.reserve_import(prompt, params, rid)))
            except RequestError as exc:
                yield _line({"error": str(exc), "field": exc.field, "status": 400})
                return
            if reserved is not None or loop.time() > deadline:
                break
            if loop.time() > next_beat:
                next_beat = loop.time() + HEARTBEAT_S
                yield _line({"waiting": True})
            await asyncio.sleep(0.02)
        if reserved is None:
            yield _line({"error": f"no free cache blocks on the decode worker for {timeout_s:g} s", "status": 503})
            return
        skip, row_bytes = reserved
        queue = asyncio.Queue()
        try:
            yield _line({"skip_tokens": skip})
            # posted once the router has been told (a router gone by now never calls the prefill)
            receiving = loop.run_in_executor(transfer.pool, transfer.recv, body["store"], body["pair"], body["tag"],
                                             state_bytes if params.seed is not None else None, row_bytes,
                                             llm.device)
            try:
                while True:  # a cancelled request still drains its receive
                    done, _ = await asyncio.wait([receiving], timeout=HEARTBEAT_S)
                    if done:
                        break
                    yield _line({"waiting": True})  # the prefill is queued: tell the router we are alive
                state, rows = receiving.result()
            except Exception as exc:
                yield _line({"tokens": [], "finished": True, "reason": "error",
                             "error": f"hand-over from the prefill worker failed ({exc})"})
                return

            def start(e):
                out = e.complete_import(rid, state, rows)
                if not out.finished:
                    engine.watch(rid, queue, loop, len(prompt))
                return out

            out = await engine.call(start)
            while True:
                yield _line({"tokens": out.new_token_ids, "finished": out.finished, "reason": out.finish_reason,
                             "error": out.error})
                if out.finished:
                    return
                out = await queue.get()
                if isinstance(out, EngineFailure):
                    yield _line({"tokens": [], "finished": True, "reason": out.reason, "error": out.message})
                    return
        finally:  # the router went away, or anything above failed: free the blocks (a no-op once finished)
            engine.abort(rid)

    app.state.worker_id = worker_id
    return app
