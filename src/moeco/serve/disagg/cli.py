"""`moeco serve MODEL_DIR --role prefill|decode|router` and the one-command `--disaggregate`.

    moeco serve MODEL --disaggregate --port 8000
        starts a prefill worker and a decode worker (each its own process, engine and cache pool, on
        free loopback ports), restarts either if it dies, and runs the router on --port
    moeco serve MODEL --role prefill --port 8101            (and --role decode --port 8102)
    moeco serve MODEL --role router --port 8000 --prefill-url http://h:8101 --decode-url http://h:8102

The router needs only MODEL's config, tokenizer and chat template (no weights). Timeouts (all
documented in `moeco serve --help`): --request-timeout (no byte from a worker for that long ends
the request with an error), --transfer-timeout (a hand-over, including the wait for the prefill,
and the decode side's wait for free blocks).
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time

from moeco.errors import ConfigError


def add_arguments(p) -> None:
    g = p.add_argument_group("disaggregated serving (prefill and decode workers)")
    g.add_argument("--disaggregate", action="store_true",
                   help="start 1 prefill worker, 1 decode worker and the router on --port")
    g.add_argument("--role", choices=["prefill", "decode", "router"], help="run one part of a disaggregated deployment")
    g.add_argument("--prefill-url", action="append", default=[], help="router: a prefill worker (repeatable)")
    g.add_argument("--decode-url", action="append", default=[], help="router: a decode worker (repeatable)")
    g.add_argument("--store-port", type=int, default=0,
                   help="router: TCP port of the rendezvous store for the hand-over groups (0: any free one)")
    g.add_argument("--transfer-timeout", type=float, default=120.0,
                   help="seconds a hand-over may take, queueing for the prefill included (default 120)")
    g.add_argument("--request-timeout", type=float, default=60.0,
                   help="router: seconds without a byte from a worker before its request ends in an error")
    g.add_argument("--transfer-backend", choices=["gloo", "nccl"], default="gloo",
                   help="gloo (CPU; workers on one GPU) or nccl (workers on different GPUs)")


def run(args) -> int:
    if args.transfer_timeout <= 0 or args.request_timeout <= 0:
        raise ConfigError("--transfer-timeout and --request-timeout must be > 0 seconds")
    if args.disaggregate and args.role:
        raise ConfigError("--disaggregate starts every role itself; leave out --role")
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.disaggregate:
        return _launch(args)
    if args.role == "router":
        return _router(args)
    return _worker(args)


def _uvicorn(app, args):
    import uvicorn

    signal.signal(signal.SIGTERM, lambda *_: None)  # uvicorn drains, then we return 0
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           access_log=args.access_log, timeout_graceful_shutdown=5))
    server.run()
    if not server.started:
        raise ConfigError(f"the server did not start on {args.host}:{args.port} (is the port in use?)")
    return 0


def _worker(args) -> int:
    from moeco.serve.async_engine import AsyncEngine
    from moeco.serve.disagg.transfer import Transfer
    from moeco.serve.disagg.worker import build_worker_app
    from moeco.serve.engine import EngineConfig, LLMEngine
    from moeco.serve.sampling_params import SamplingParams

    engine = LLMEngine(EngineConfig(
        model_dir=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        cache_bytes=args.cache_bytes, gpu_memory_utilization=args.gpu_memory_utilization,
        keep_fp8=args.keep_fp8, speculative=args.speculative))
    engine.add_request([0, 0, 0, 0], SamplingParams(max_tokens=2, ignore_eos=True))  # warm up
    while engine.has_unfinished():
        engine.step()
    app = build_worker_app(args.role, AsyncEngine(engine), Transfer(args.transfer_timeout, args.transfer_backend),
                           args.transfer_timeout)
    logging.getLogger("moeco.serve").info("%s worker %s on %s:%d", args.role, app.state.worker_id, args.host,
                                          args.port)
    return _uvicorn(app, args)


def _router(args) -> int:
    if not args.prefill_url or not args.decode_url:
        raise ConfigError("--role router needs at least one --prefill-url and one --decode-url")
    from moeco.config import ModelConfig
    from moeco.chat_template import ChatTemplate, ChatTemplateError
    from moeco.serve.disagg.router import Router
    from moeco.loading import load_tokenizer
    from moeco.serve.metrics import ServerMetrics
    from moeco.serve.server import ServerState, build_app

    try:
        template = ChatTemplate.from_model_dir(args.model)
    except ChatTemplateError as exc:
        raise ConfigError(str(exc)) from None
    mcfg = ModelConfig.from_hf(args.model)
    # the address workers reach the rendezvous store at: the router's own, or its hostname when bound to all
    store_host = socket.gethostname() if args.host in ("0.0.0.0", "::", "") else args.host
    router = Router(args.prefill_url, args.decode_url, store_host=store_host, store_port=args.store_port,
                    request_timeout_s=args.request_timeout, max_requests=args.max_num_seqs + args.max_queued_requests)
    name = args.served_model_name or args.model
    metrics = router.metrics = ServerMetrics(router.stats, name)
    metrics.registry.register(_Collect(router))
    state = ServerState(router, name, load_tokenizer(args.model), template,
                        args.max_model_len or mcfg.max_position_embeddings, metrics, args.api_key)
    return _uvicorn(build_app(state, max_body_bytes=args.max_body_bytes), args)


class _Collect:
    def __init__(self, router):
        self.router = router

    def collect(self):
        return self.router.collect()


def _launch(args) -> int:
    """Two worker processes (restarted when they die) and the router in this one."""
    ports = {"prefill": _free_port(), "decode": _free_port()}
    passed = _worker_args(args)
    procs: dict[str, subprocess.Popen] = {}
    stopping = threading.Event()

    def spawn(role):
        cmd = [sys.executable, "-m", "moeco", "serve", args.model, "--role", role, "--port", str(ports[role]),
               *passed]
        procs[role] = subprocess.Popen(cmd)

    def supervise():
        while not stopping.wait(0.5):
            for role, proc in list(procs.items()):
                if proc.poll() is not None and not stopping.is_set():
                    logging.getLogger("moeco.serve").warning("%s worker exited with %s; restarting it", role,
                                                             proc.returncode)
                    spawn(role)

    for role in ports:
        spawn(role)
    watcher = threading.Thread(target=supervise, name="moeco-supervisor", daemon=True)
    watcher.start()
    args.prefill_url = [f"http://127.0.0.1:{ports['prefill']}"]
    args.decode_url = [f"http://127.0.0.1:{ports['decode']}"]
    try:
        return _router(args)
    finally:
        stopping.set()
        watcher.join()
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 30
        for proc in procs.values():
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_args(args) -> list[str]:
    out = ["--dtype", args.dtype, "--device", args.device, "--max-num-seqs", str(args.max_num_seqs),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--log-level", args.log_level,
           "--transfer-timeout", str(args.transfer_timeout), "--transfer-backend", args.transfer_backend,
           "--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    for flag, value in (("--max-model-len", args.max_model_len), ("--cache-bytes", args.cache_bytes),
                        ("--speculative", args.speculative)):
        if value is not None:
            out += [flag, str(value)]
    if args.keep_fp8:
        out.append("--keep-fp8")
    return out
