"""The router: the OpenAI front door (moeco.serve.server, unchanged) over prefill and decode workers.

`Router` has the interface of `AsyncEngine` that the server drives (add, abort, release, stats), so
every route, error body and metric of colocated serving is the same here. One request:

    1. pick a decode worker (fewest requests in flight from this router, then most free blocks) and
       open its /generate stream: it reserves the blocks and says how many prompt tokens it already
       holds (prefix hits); a refusal there (bad parameters) is the client's 400
    2. pick a prefill worker (fewest in flight) and POST /prefill: it prefills, sends the latent rows
       and the first token over torch.distributed straight to the decode worker, and reports bytes
       and seconds; once the decode side has reserved, this call always goes out (even if the
       client has left), so the decode worker's posted receive is always answered
    3. relay the decode stream's tokens to the client

Failures: a worker that dies breaks its HTTP connections, so each request it held ends at once with
an error event; a worker that hangs is caught by the timeouts (`request_timeout_s`: no byte from a
worker for that long; the workers' `transfer_timeout_s` bounds a hand-over). A health check every
`health_interval_s` marks workers down (they get no new requests) and up again; a restarted worker
comes back with a new id and meets its peers in new process groups. Every wait has a timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field

import httpx
import torch.distributed as dist
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from moeco.serve.async_engine import EngineFailure, Overloaded
from moeco.serve.sampling_params import RequestError

log = logging.getLogger("moeco.serve.disagg")


@dataclass
class Output:  # what the server's Generation reads from a RequestOutput
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    error: str | None


@dataclass(eq=False)
class Worker:
    url: str
    role: str
    id: str | None = None
    up: bool = False
    stats: dict = field(default_factory=dict)
    in_flight: int = 0
    requests: int = 0
    failures: int = 0
    transfer_bytes: int = 0
    transfer_tokens: int = 0
    transfer_seconds: float = 0.0


class Router:
    def __init__(self, prefill_urls: list[str], decode_urls: list[str], store_host: str = "127.0.0.1",
                 store_port: int = 0, request_timeout_s: float = 60.0, health_interval_s: float = 1.0,
                 max_requests: int = 4096):
        self.workers = [Worker(u.rstrip("/"), "prefill") for u in prefill_urls] + \
                       [Worker(u.rstrip("/"), "decode") for u in decode_urls]
        self.store_host, self.store_port = store_host, store_port
        self.timeout_s, self.health_interval_s = request_timeout_s, health_interval_s
        self.max_requests = max_requests
        self.draining = False
        self.metrics = None
        self._in_flight = 0
        self._tasks: dict[str, asyncio.Task] = {}
        self._tags = itertools.count()
        self._epochs: dict[tuple[str, str], int] = {}
        self._store = None
        self._client: httpx.AsyncClient | None = None
        self._health: asyncio.Task | None = None

    # ---- lifecycle (the server's lifespan calls these) -------------------------------------------
    def start(self) -> None:
        self._store = dist.TCPStore(self.store_host, self.store_port, is_master=True, wait_for_workers=False)
        self.store_port = self._store.port
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout_s, connect=5.0), limits=limits)
        self._health = asyncio.get_running_loop().create_task(self._check_health())

    def shutdown(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        if self._health:
            self._health.cancel()

    def is_alive(self) -> bool:
        return any(w.up for w in self.workers if w.role == "prefill") and \
            any(w.up for w in self.workers if w.role == "decode")

    @property
    def num_in_flight(self) -> int:
        return self._in_flight

    def stats(self) -> dict:
        """Engine-style totals over the workers that are up (the server's gauges read these)."""
        up = [w for w in self.workers if w.up]
        dec = [w.stats for w in up if w.role == "decode"]
        total = sum(s.get("total_blocks", 0) for s in dec)
        free = sum(s.get("free_blocks", 0) for s in dec)
        hits = [s["prefix_cache_hit_rate"] for s in dec if "prefix_cache_hit_rate" in s]
        return {"running": sum(w.stats.get("running", 0) for w in up),
                "waiting": sum(w.stats.get("waiting", 0) for w in up),
                "free_blocks": free, "total_blocks": total, "cache_usage": 1 - free / total if total else 0.0,
                "prefix_cache_hit_rate": sum(hits) / len(hits) if hits else 0.0, "spec_acceptance_rate": None,
                "num_preemptions": sum(s.get("num_preemptions", 0) for s in dec)}

    async def _check_health(self) -> None:
        while True:
            await asyncio.gather(*(self._probe(w) for w in self.workers))
            await asyncio.sleep(self.health_interval_s)

    async def _probe(self, w: Worker) -> None:
        try:
            r = await self._client.get(w.url + "/info", timeout=max(1.0, self.health_interval_s * 2))
            info = r.json()
            if info["id"] != w.id and w.id is not None:
                log.warning("%s worker %s is back as %s", w.role, w.url, info["id"])
            w.id, w.stats, w.up = info["id"], info["stats"], True
        except (httpx.HTTPError, ValueError, KeyError):
            if w.up:
                log.warning("%s worker %s is down", w.role, w.url)
            w.up = False

    # ---- requests (the AsyncEngine interface) ----------------------------------------------------
    def _pick(self, role: str) -> Worker:
        up = [w for w in self.workers if w.role == role and w.up]
        if not up:
            raise Overloaded(f"no {role} worker is up")
        return min(up, key=lambda w: (w.in_flight, -w.stats.get("free_blocks", 0)))

    async def add(self, prompt_ids: list[int], params, queue: asyncio.Queue) -> str:
        if self.draining:
            raise Overloaded("the server is shutting down")
        if self._in_flight >= self.max_requests:
            raise Overloaded(f"{self._in_flight} requests are in flight, the limit is {self.max_requests}")
        dec, pre = self._pick("decode"), self._pick("prefill")
        rid = f"cmpl-{uuid.uuid4().hex}"
        key = (pre.id, dec.id)
        pair = f"{pre.id}|{dec.id}|{self._epochs.get(key, 0)}"
        job = {"request_id": rid, "prompt": prompt_ids, "params": asdict(params), "pair": pair,
               "store": f"{self.store_host}:{self.store_port}", "tag": 4 * next(self._tags)}
        self._in_flight += 1
        dec.in_flight += 1
        pre.in_flight += 1
        try:
            resp = await self._client.send(self._client.build_request("POST", dec.url + "/generate", json=job),
                                           stream=True)
            lines = resp.aiter_lines()
            first = {"waiting": True}
            while "waiting" in first:  # heartbeats while the decode worker waits for free blocks
                first = json.loads(await anext(lines))
        except BaseException as exc:
            self._in_flight -= 1
            dec.in_flight -= 1
            pre.in_flight -= 1
            self._bump(pre, dec)  # the decode side may have posted a receive nobody will answer
            if isinstance(exc, (httpx.HTTPError, StopAsyncIteration, ValueError)):
                self._down(dec, exc)
                raise Overloaded(f"decode worker {dec.url} did not answer ({type(exc).__name__})") from None
            raise
        if "error" in first:
            await resp.aclose()
            self._in_flight -= 1
            dec.in_flight -= 1
            pre.in_flight -= 1
            if first.get("status") == 400:
                raise RequestError(first.get("field") or "prompt", first["error"])
            raise Overloaded(first["error"])
        job["skip_tokens"] = first["skip_tokens"]
        if self.metrics:
            self.metrics.prompt_tokens.inc(len(prompt_ids))
        loop = asyncio.get_running_loop()
        # the prefill call always goes out once the decode side has posted its receive, even if the
        # client leaves at once: an unanswered receive would break the pair's process group
        prefill = loop.create_task(self._prefill(job, pre, dec))
        task = self._tasks[rid] = loop.create_task(self._relay(rid, prefill, pre, dec, lines, queue))

        def done(_):  # runs even for a task cancelled before it started
            dec.in_flight -= 1
            self._tasks.pop(rid, None)
            loop.create_task(resp.aclose())  # the decode worker aborts the request if it still runs

        task.add_done_callback(done)
        return rid

    def _bump(self, pre: Worker, dec: Worker) -> None:
        """A failed hand-over may leave the pair's group broken: the next requests use a new one."""
        self._epochs[(pre.id, dec.id)] = self._epochs.get((pre.id, dec.id), 0) + 1

    def _down(self, w: Worker, exc) -> None:
        w.failures += 1
        w.up = False  # until the next health check says otherwise
        log.warning("%s worker %s failed: %s", w.role, w.url, exc)

    async def _prefill(self, job: dict, pre: Worker, dec: Worker) -> str | None:
        """POST /prefill; None on success, else the error message."""
        try:
            r = await self._client.post(pre.url + "/prefill", json=job)
            body = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            self._down(pre, exc)
            self._bump(pre, dec)
            return f"prefill worker {pre.url} failed ({type(exc).__name__}: {exc})"
        finally:
            pre.in_flight -= 1
        if r.status_code != 200:  # the decode side's posted receive goes unanswered: new group next time
            self._bump(pre, dec)
            return body.get("error", f"prefill worker answered {r.status_code}")
        pre.requests += 1
        for w in (pre, dec):
            w.transfer_bytes += body["bytes"]
            w.transfer_tokens += body["tokens"]
            w.transfer_seconds += body["seconds"]
        return None

    async def _relay(self, rid, prefill: asyncio.Task, pre: Worker, dec: Worker, lines, queue) -> None:
        arrival, first, last, n, reason = time.monotonic(), None, None, 0, "abort"
        try:
            error = await asyncio.shield(prefill)
            if error is not None:
                reason = "error"
                queue.put_nowait(EngineFailure(rid, error))
                return
            async for line in lines:
                item = json.loads(line)
                if "waiting" in item:  # a heartbeat
                    continue
                out = Output(rid, item["tokens"], item["finished"], item["reason"], item["error"])
                if out.new_token_ids:
                    first, last, n = first or time.monotonic(), time.monotonic(), n + len(out.new_token_ids)
                    if self.metrics:
                        self.metrics.generation_tokens.inc(len(out.new_token_ids))
                queue.put_nowait(out)
                if out.finished:
                    reason = "error" if out.error else (out.finish_reason or "stop")
                    if out.error:
                        self._bump(pre, dec)
                    dec.requests += 1
                    return
            raise httpx.RemoteProtocolError("the stream ended before the request finished")
        except (httpx.HTTPError, ValueError) as exc:
            reason = "error"
            self._down(dec, exc)
            queue.put_nowait(EngineFailure(rid, f"decode worker {dec.url} failed mid-request "
                                                f"({type(exc).__name__}: {exc})"))
        finally:
            if self.metrics:
                self.metrics.request_finished(reason, arrival, first, last, n, time.monotonic())

    def abort(self, rid: str, reason: str = "abort") -> None:
        task = self._tasks.pop(rid, None)
        if task is not None:
            task.cancel()

    def abort_all(self, message: str) -> None:
        for rid in list(self._tasks):
            self.abort(rid)

    def release(self) -> None:
        self._in_flight -= 1

    # ---- /metrics --------------------------------------------------------------------------------
    def collect(self):
        """Per-worker load and hand-over figures, added to the server's registry."""
        up = GaugeMetricFamily("moeco:disagg_worker_up", "1 while the worker passes its health check.",
                               labels=["role", "url"])
        load = GaugeMetricFamily("moeco:disagg_worker_in_flight", "Requests this router has on the worker.",
                                 labels=["role", "url"])
        running = GaugeMetricFamily("moeco:disagg_worker_running", "The worker engine's running requests.",
                                    labels=["role", "url"])
        waiting = GaugeMetricFamily("moeco:disagg_worker_waiting", "The worker engine's waiting requests.",
                                    labels=["role", "url"])
        free = GaugeMetricFamily("moeco:disagg_worker_free_blocks", "Free blocks in the worker's pool.",
                                 labels=["role", "url"])
        nbytes = CounterMetricFamily("moeco:disagg_transfer_bytes", "Latent bytes handed over.", labels=["role", "url"])
        ntok = CounterMetricFamily("moeco:disagg_transfer_tokens", "Prompt tokens handed over.", labels=["role", "url"])
        secs = CounterMetricFamily("moeco:disagg_transfer_seconds", "Seconds spent sending hand-overs.",
                                   labels=["role", "url"])
        fails = CounterMetricFamily("moeco:disagg_worker_failures", "Requests ended by a worker failure.",
                                    labels=["role", "url"])
        for w in self.workers:
            lab = [w.role, w.url]
            up.add_metric(lab, float(w.up))
            load.add_metric(lab, w.in_flight)
            running.add_metric(lab, w.stats.get("running", 0))
            waiting.add_metric(lab, w.stats.get("waiting", 0))
            free.add_metric(lab, w.stats.get("free_blocks", 0))
            nbytes.add_metric(lab, w.transfer_bytes)
            ntok.add_metric(lab, w.transfer_tokens)
            secs.add_metric(lab, w.transfer_seconds)
            fails.add_metric(lab, w.failures)
        yield from (up, load, running, waiting, free, nbytes, ntok, secs, fails)
