"""The engine behind the HTTP server: one background thread steps `LLMEngine`, asyncio waits.

    thread "moeco-engine":  loop { run queued adds/aborts; step(); push each RequestOutput to its
                                   request's asyncio.Queue (loop.call_soon_threadsafe) }
    event loop:             handlers `await add(...)`, then read their queue; `abort(rid)` on a
                            disconnect, a stop string or an error

`LLMEngine` is not thread-safe, so only the engine thread touches it: `add` and `abort` are queued
as small operations that the thread runs between steps (`add` waits for its result, so a request the
engine refuses raises `RequestError` in the handler before any response is sent). When nothing is
running the thread sleeps on an event instead of spinning. If a step raises (a bug), every request
in flight ends with an error and the engine is emptied; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from dataclasses import dataclass

from moeco.serve.metrics import ServerMetrics

log = logging.getLogger("moeco.serve")


class Overloaded(Exception):
    """More requests in flight than the server accepts (HTTP 503)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float
    num_prompt_tokens: int
    first: float | None = None
    last: float | None = None
    num_output_tokens: int = 0


@dataclass
class EngineFailure:
    """Put on a request's queue in place of a RequestOutput when the request is ended under it:
    the engine failed ("error") or the server is shutting down ("abort")."""

    request_id: str
    message: str
    reason: str = "error"


class AsyncEngine:
    def __init__(self, engine, metrics: ServerMetrics | None = None, max_requests: int = 4096):
        self.engine = engine
        self.metrics = metrics
        self.max_requests = max_requests  # requests in flight (running + waiting) before 503
        self._ops: list = []
        self._ops_lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}  # touched by the engine thread only
        self._in_flight = 0  # touched by the event loop only
        self._stopping = False
        self.draining = False  # set when SIGTERM arrives: new requests are refused with 503
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="moeco-engine", daemon=True)

    # ---- event-loop side --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> dict:
        """The engine's counters as of its last step (a snapshot; safe from any thread)."""
        return self._stats

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    async def add(self, prompt_ids: list[int], params, queue: asyncio.Queue) -> str:
        """Submit one request; its outputs go to `queue`. Raises RequestError, Overloaded."""
        if self._stopping or self.draining:
            raise Overloaded("the server is shutting down")
        if self._in_flight >= self.max_requests:
            raise Overloaded(f"{self._in_flight} requests are in flight, the limit is {self.max_requests}")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        rid = f"cmpl-{uuid.uuid4().hex}"
        stream = _Stream(loop, queue, time.monotonic(), len(prompt_ids))

        def op():
            try:
                self.engine.add_request(prompt_ids, params, rid)
            except Exception as exc:  # RequestError for the client; anything else is reported the same way
                _settle(loop, done, exc=exc)
                return
            self._streams[rid] = stream
            if self.metrics:
                self.metrics.prompt_tokens.inc(len(prompt_ids))
            _settle(loop, done, result=rid)

        self._in_flight += 1
        self._submit(op)
        try:
            await done
        except asyncio.CancelledError:  # the client left while we waited: the add still runs, so undo it
            self._in_flight -= 1
            self.abort(rid)  # operations run in order, so this one follows the add
            raise
        except Exception:
            self._in_flight -= 1
            raise
        return rid

    async def call(self, fn):
        """Run fn(engine) on the engine thread between steps; its result, or what it raised."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def op():
            try:
                result = fn(self.engine)
            except Exception as exc:
                _settle(loop, done, exc=exc)
                return
            _settle(loop, done, result=result)

        self._submit(op)
        return await done

    def watch(self, rid: str, queue: asyncio.Queue, loop, num_prompt_tokens: int) -> None:
        """Engine thread only (inside `call`): send the outputs of a request added another way to `queue`."""
        self._streams[rid] = _Stream(loop, queue, time.monotonic(), num_prompt_tokens)

    def release(self) -> None:
        """The handler is done with one request (finished or aborted)."""
        self._in_flight -= 1

    def abort(self, rid: str, reason: str = "abort") -> None:
        """Stop a request and free its blocks; `reason` is what the metrics record (a stop string
        found by the server finishes a request as "stop")."""

        def op():
            stream = self._streams.pop(rid, None)
            self.engine.abort(rid)
            if stream is not None:
                self._record(stream, reason, time.monotonic())

        self._submit(op)

    def abort_all(self, message: str) -> None:
        """End every request in flight (the grace period after SIGTERM is over)."""

        def op():
            for rid in list(self._streams):
                self._fail(rid, message, "abort")

        self._submit(op)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort whatever is left and stop the thread."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)

    def _submit(self, op) -> None:
        with self._ops_lock:
            self._ops.append(op)
        self._wake.set()

    # ---- engine-thread side -----------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._ops_lock:
                ops, self._ops = self._ops, []
            for op in ops:
                op()
            if self._stopping:
                for rid in list(self._streams):
                    self._fail(rid, "the server shut down before this request finished", "abort")
                self._stats = engine.stats()
                return
            if not engine.has_unfinished():
                self._stats = engine.stats()
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = engine.step()
            except Exception:
                log.exception("engine step failed; failing the %d requests in flight", len(self._streams))
                for rid in list(self._streams):
                    self._fail(rid, "internal error in the serving engine", "error")
                self._stats = engine.stats()
                continue
            now = time.monotonic()
            batch = []  # one hand-over to the event loop per step, not one per request
            generated = 0
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:  # aborted meanwhile
                    continue
                if out.new_token_ids:
                    stream.first = stream.first or now
                    stream.last = now
                    stream.num_output_tokens += len(out.new_token_ids)
                    generated += len(out.new_token_ids)
                if out.finished:
                    del self._streams[out.request_id]
                    self._record(stream, "error" if out.error else (out.finish_reason or "stop"), now)
                batch.append((stream, out))
            if self.metrics and generated:
                self.metrics.generation_tokens.inc(generated)
            _deliver_all(batch)
            self._stats = engine.stats()

    def _fail(self, rid: str, message: str, reason: str) -> None:
        stream = self._streams.pop(rid)
        try:
            self.engine.abort(rid)
        except Exception:  # the engine is already in trouble; the request is gone either way
            log.exception("abort of %s failed", rid)
        self._record(stream, reason, time.monotonic())
        _deliver(stream, EngineFailure(rid, message, reason))

    def _record(self, stream: _Stream, reason: str, now: float) -> None:
        if self.metrics:
            self.metrics.request_finished(reason, stream.arrival, stream.first, stream.last,
                                          stream.num_output_tokens, now)


def _deliver_all(batch: list[tuple[_Stream, object]]) -> None:
    by_loop: dict = {}
    for stream, item in batch:
        by_loop.setdefault(stream.loop, []).append((stream.queue, item))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, items)
        except RuntimeError:  # the event loop has closed (server shutdown): nobody is listening
            pass


def _put_all(items) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _deliver(stream: _Stream, item) -> None:
    try:
        stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
    except RuntimeError:  # the event loop has closed (server shutdown): nobody is listening
        pass


def _settle(loop, future, result=None, exc=None) -> None:
    def set_():
        if not future.done():
            future.set_exception(exc) if exc is not None else future.set_result(result)

    try:
        loop.call_soon_threadsafe(set_)
    except RuntimeError:
        pass
