"""`moeco serve MODEL_DIR`: load the checkpoint, then serve the OpenAI API until SIGTERM or Ctrl-C.

The model is loaded (and one short request run through it) before the port opens, so a client
that sees the port open can send requests. SIGTERM: the server stops accepting connections (and
answers 503 on open ones), lets the requests in flight finish for up to --grace-period seconds,
then ends the rest (finish_reason "abort", their cache blocks freed), stops the engine thread and
exits 0. With `--ep P` under torchrun (P ranks) the experts are sharded over the ranks: rank 0
serves and hands requests to the ranks, whose engines step together (moeco.serve.ep_front).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

from moeco.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint over an OpenAI-compatible HTTP API")
    p.add_argument("model", help="checkpoint directory (HF layout, with tokenizer.json for text prompts)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("MOECO_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $MOECO_API_KEY, else none)")
    p.add_argument("--served-model-name", help="the model name clients send (default: MODEL_DIR as given)")
    p.add_argument("--max-model-len", type=int, help="context length (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences in the running batch")
    p.add_argument("--max-num-batched-tokens", type=int, default=4096, help="tokens per engine step")
    p.add_argument("--max-queued-requests", type=int, default=1024,
                   help="requests waiting beyond --max-num-seqs before the server answers 503")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--cache-bytes", type=int, help="latent cache size in bytes (default: 1 GiB on CPU, "
                                                   "--gpu-memory-utilization on CUDA)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--keep-fp8", action="store_true", help="keep an FP8 checkpoint's weights in FP8")
    p.add_argument("--speculative", choices=["mtp"], default=None, help="MTP speculative decoding")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, help="largest request body accepted")
    p.add_argument("--grace-period", type=float, default=30.0,
                   help="seconds in-flight responses get to finish after SIGTERM before they are aborted")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--access-log", action="store_true", help="log every request")
    g = p.add_argument_group("expert parallelism (under torchrun: torchrun --nproc-per-node P -m moeco serve ... --ep P)")
    g.add_argument("--ep", type=int, default=1, help="ranks sharing the routed experts; rank 0 serves HTTP")
    g.add_argument("--gpus-per-node", type=int, default=0, help="mesh node size for --ep (0 = --nproc-per-node)")
    g.add_argument("--dispatcher", choices=["two_hop", "direct"], default="two_hop")
    g.add_argument("--overlap", choices=["none", "two_microbatch"], default="none",
                   help="run each forward as two micro-batches, one's all-to-all under the other's compute")
    from moeco.serve.disagg.cli import add_arguments

    add_arguments(p)  # --disaggregate, --role ...
    p.set_defaults(func=run_serve)


def _check(args) -> None:
    if not Path(args.model).is_dir():
        raise ConfigError(f"model directory {args.model!r} not found; pass a checkpoint directory "
                          "(e.g. runs/tiny/model from `make run`)")
    for name in ("max_num_seqs", "max_num_batched_tokens", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} = {getattr(args, name)}; use an integer >= 1")
    if args.max_queued_requests < 0 or args.grace_period < 0:
        raise ConfigError("--max-queued-requests and --grace-period must be >= 0")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port = {args.port}; use 0..65535")
    if args.api_key is not None and not args.api_key:
        raise ConfigError("--api-key is empty; give a key or leave the option out")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if args.ep != 1 and args.ep != world:
        raise ConfigError(f"--ep {args.ep} needs torchrun with {args.ep} ranks (there are {world}): "
                          f"torchrun --nproc-per-node {args.ep} -m moeco serve ... --ep {args.ep}")
    if args.ep > 1 and (args.disaggregate or args.role or args.speculative):
        raise ConfigError("--ep > 1 does not combine with --disaggregate, --role or --speculative; leave them out")


def run_serve(args) -> int:
    _check(args)
    if args.disaggregate or args.role:
        from moeco.serve.disagg.cli import run

        return run(args)
    try:
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as exc:
        raise ConfigError(f"moeco serve needs the serve extra ({exc.name} is missing): "
                          "pip install 'moeco[serve]'") from None
    from moeco.chat_template import ChatTemplate, ChatTemplateError
    from moeco.serve.engine import EngineConfig, LLMEngine

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("moeco.serve")
    try:
        template = ChatTemplate.from_model_dir(args.model)
    except ChatTemplateError as exc:
        raise ConfigError(str(exc)) from None
    engine = LLMEngine(EngineConfig(
        model_dir=args.model, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        cache_bytes=args.cache_bytes, gpu_memory_utilization=args.gpu_memory_utilization,
        keep_fp8=args.keep_fp8, speculative=args.speculative, ep=args.ep, gpus_per_node=args.gpus_per_node,
        dispatcher=args.dispatcher, overlap=args.overlap))
    if args.ep > 1:  # rank 0 serves over every rank's engine; the others step with it (moeco.serve.ep)
        import torch.distributed as dist

        from moeco.parallel.dist import leave
        from moeco.serve.ep_front import FrontEngine, control_group, follow

        group = control_group()
        if dist.get_rank() != 0:
            signal.signal(signal.SIGTERM, lambda *_: None)  # torchrun forwards it: rank 0 drains, then releases us
            follow(engine, group)
            leave(group)
            return 0
        engine = FrontEngine(engine, group)
    try:
        return _serve(args, engine, template, log)
    finally:
        if args.ep > 1:
            engine.close()
            leave(group)


def _serve(args, engine, template, log) -> int:
    """Warm up, then serve HTTP until SIGTERM (engine: an LLMEngine, or the EP group's FrontEngine)."""
    import uvicorn

    from moeco.serve.async_engine import AsyncEngine
    from moeco.serve.metrics import ServerMetrics
    from moeco.serve.sampling_params import SamplingParams
    from moeco.serve.server import ServerState, build_app

    engine.add_request([0, 0, 0, 0], SamplingParams(max_tokens=2, ignore_eos=True))  # warm up before opening
    while engine.has_unfinished():
        engine.step()
    name = args.served_model_name or args.model
    async_engine = AsyncEngine(engine, None, max_requests=args.max_num_seqs + args.max_queued_requests)
    metrics = ServerMetrics(async_engine.stats, name)
    async_engine.metrics = metrics
    state = ServerState(async_engine, name, engine.tokenizer, template, engine.max_model_len, metrics, args.api_key)
    app = build_app(state, max_body_bytes=args.max_body_bytes)
    stats = engine.stats()
    log.info("model %s on %s: context %d, latent cache %s tokens, chat template: %s, API key: %s",
             name, engine.device, engine.max_model_len, f"{stats['capacity_tokens']:,}", template.origin,
             "required" if args.api_key else "none")
    # uvicorn's own timeout cancels tasks (and logs each one); ours ends the requests cleanly first
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            access_log=args.access_log, timeout_graceful_shutdown=args.grace_period + 10,
                            lifespan="on")

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            async_engine.draining = True
            asyncio.get_running_loop().call_later(
                args.grace_period, async_engine.abort_all,
                f"the server shut down; this request ran past the {args.grace_period:g} s grace period")
            await super().shutdown(sockets)

    server = DrainingServer(config)
    # uvicorn re-raises the signal that stopped it once it has drained; this handler turns SIGTERM
    # into a normal return (exit 0) instead of death by signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    if not server.started:
        raise ConfigError(f"the server did not start on {args.host}:{args.port} (is the port in use?)")
    log.info("stopped")
    return 0
