"""`moeco generate` (sample from a checkpoint) and `moeco demo` (build, save, reload, generate)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from moeco.generate import generate

from moeco.errors import ConfigError, LoadError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "auto": None}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint directory (HF layout)")
    p.add_argument("model", help="checkpoint directory (config.json + safetensors [+ tokenizer.json])")
    p.add_argument("--prompt", default="", help="text prompt (needs tokenizer.json beside the model)")
    p.add_argument("--prompt-ids", default=None, help="comma-separated token ids, instead of --prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=list(_DTYPES), default="auto")
    p.add_argument("--device", default="cpu")
    p.add_argument("--keep-fp8", action="store_true",
                   help="keep an FP8 checkpoint's weights in FP8 (half the memory of BF16; FP8 GEMMs on CUDA)")
    p.add_argument("--ep", type=int, default=1,
                   help="expert parallelism under torchrun: each rank holds n_routed_experts / EP experts; every "
                        "rank generates the same prompt, rank 0 prints")
    p.add_argument("--gpus-per-node", type=int, default=0, help="mesh node size for --ep (0 = --nproc-per-node)")
    p.set_defaults(func=run_generate)

    d = sub.add_parser("demo", help="build the tiny preset, save it as an HF checkpoint, reload it, generate")
    d.add_argument("--out", default="runs/demo", help="where the checkpoint is written")
    d.add_argument("--preset", default="tiny")
    d.add_argument("--overwrite", action="store_true", help="replace a model already in --out with the demo's")
    d.set_defaults(func=run_demo)


def _device(name: str) -> torch.device:
    """--device as a torch.device that this build of torch can use."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name!r} but this torch build sees no CUDA device "
                              f"(torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                              f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise ConfigError(f"--device {name!r} is not supported; use cpu, cuda or cuda:N")
    return device


def _prompt_ids(args, tokenizer) -> list[int]:
    if args.prompt_ids:
        try:
            return [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise ConfigError(f"--prompt-ids {args.prompt_ids!r} is not a comma-separated list of integers") from None
    if tokenizer is None:
        raise LoadError(f"{args.model} has no tokenizer.json; pass --prompt-ids 1,2,3 or add the tokenizer")
    ids = tokenizer.encode(args.prompt or "\n").ids
    return ids or [0]


def run_generate(args) -> int:
    from moeco.loading import load_pretrained, load_tokenizer

    for name in ("max_new_tokens",):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} = {getattr(args, name)} must be >= 1")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ConfigError(f"--temperature {args.temperature} is invalid: must be a finite number >= 0 (0 = greedy)")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p {args.top_p} is invalid: must be in (0, 1]")
    if args.top_k < 0:
        raise ConfigError(f"--top-k {args.top_k} is invalid: must be >= 0 (0 = off)")
    args.device = str(_device(args.device))
    model_dir = Path(args.model)
    main, ranks = True, None
    if getattr(args, "ep", 1) > 1:
        from moeco.parallel.checkpoint import load_expert_parallel

        model, _, ranks = load_expert_parallel(model_dir, args.ep, args.gpus_per_node, device=args.device,
                                               dtype=_DTYPES[args.dtype])
        main, args.device = ranks.main, str(ranks.device)
    else:
        model = load_pretrained(model_dir, dtype=_DTYPES[args.dtype], device=args.device, keep_fp8=args.keep_fp8)
    tokenizer = load_tokenizer(model_dir)
    prompt = _prompt_ids(args, tokenizer)
    vocab = model.config.vocab_size
    if max(prompt) >= vocab:
        raise ConfigError(f"prompt token id {max(prompt)} is outside the model's vocab_size = {vocab}")
    ids = torch.tensor([prompt], device=args.device)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    start = time.perf_counter()
    out = generate(model, ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         top_k=args.top_k, eos_token_id=model.config.eos_token_id if tokenizer else None,
                         generator=gen, vocab_limit=tokenizer.get_vocab_size() if tokenizer else None)
    seconds = time.perf_counter() - start
    if ranks is not None:  # every rank is done with the collectives: leave together (see Dist.leave)
        ranks.leave()
    if not main:
        return 0
    new = out[0, len(prompt):].tolist()
    text = tokenizer.decode(out[0].tolist()) if tokenizer else " ".join(map(str, out[0].tolist()))
    print(text)
    cache_bytes = model.config.kv_cache_bytes_per_token(model.model.embed_tokens.weight.element_size())
    print(f"\n[{len(new)} new tokens in {seconds:.2f} s, {len(new) / seconds:.1f} tokens/s; "
          f"latent cache {cache_bytes:,} bytes/token]")
    return 0


def run_demo(args) -> int:
    from moeco import ModelConfig, Transformer, load_pretrained

    from moeco.model.transformer import param_count
    from moeco.resources import check_fits

    config = ModelConfig.preset(args.preset)
    out = Path(args.out)
    if (out / "config.json").exists() and not args.overwrite:
        raise ConfigError(f"--out {str(out)!r} already holds a model (config.json); the demo would replace it with "
                          f"random weights: pass --overwrite to do so, or choose another --out")
    n = param_count(config)
    check_fits(4 * n, "cpu", f"the {args.preset!r} demo's float32 weights ({n / 1e6:,.1f}M parameters)",
               "choose a smaller preset, e.g. --preset tiny")
    torch.manual_seed(0)
    model = Transformer(config)
    model.save_pretrained(out)
    reloaded = load_pretrained(out)
    prompt = torch.tensor([[config.bos_token_id or 0, 5, 6, 7]])
    tokens = generate(reloaded, prompt, max_new_tokens=16)
    cache = reloaded.new_cache(1, 1)
    print(f"built '{args.preset}': {model.num_params() / 1e6:.2f}M parameters "
          f"({config.num_hidden_layers} layers, {config.n_routed_experts} routed experts, "
          f"{config.num_nextn_predict_layers} MTP module)")
    print(f"saved and reloaded the Hugging Face checkpoint at {out}/")
    print(f"generated (untrained, greedy): {tokens[0].tolist()}")
    print(f"latent cache: {config.latent_dim} values/token/layer = {cache.bytes_per_token():,} bytes/token "
          f"({cache.latent.dtype}); DeepSeek-V3 in BF16: "
          f"{ModelConfig.preset('deepseek-v3').kv_cache_bytes_per_token(2):,} bytes/token")
    return 0
