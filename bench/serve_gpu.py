"""Serving on one GPU: decode speed against the HBM floor and against transformers, throughput,
the paged MLA decode kernel, and how many sequences the latent pool holds.

    PYTHONPATH=src python bench/serve_gpu.py --out results/            (all sections, ~5 min on an H200)
    PYTHONPATH=src python bench/serve_gpu.py --only kernel,decode

Sections (random bf16 weights of the `small` preset, the same weights for every contender):
  floor       device-to-device copy bandwidth: the HBM ceiling the decode figures are measured against
  decode      batch-1 decode: moeco.generate (the reference loop), transformers' generate (default
              cache and cache_implementation="static"), and the serving engine (paged cache, CUDA
              graphs); ms per token and the GB/s the engine's step achieves (weights + latent cache
              read per step / step time) against the floor
  throughput  N concurrent requests of --in / --out tokens through the engine, against transformers'
              batch-32 generate (static cache) of the same lengths
  kernel      the paged absorbed-MLA decode kernel at DeepSeek-V3's shapes (128 heads, d_c 512, rope 64),
              batch 64, context 4096, against its PyTorch reference and the HBM floor
  capacity    sequences of 4,096 tokens a 100 GB latent pool holds (filled block by block), against a
              per-head K/V cache (MHA) and an 8:1 GQA cache of the same model
  compiled    batch-1 decode with EngineConfig.compile (torch.compile of the decode step) beside the
              plain engine
  spec        MTP speculative decoding at batch 1 on a trained checkpoint with an MTP layer
              (--spec-model, e.g. the model `make run` trains): acceptance rate and TPOT against the
              same engine without speculation, prompts from the embedded corpus
Writes serve_gpu.json into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import gpu_ms  # noqa: E402

from moeco.config import ModelConfig  # noqa: E402
from moeco.generate import generate  # noqa: E402
from moeco.model.transformer import Transformer  # noqa: E402


def floor_gbps() -> float:
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = gpu_ms(lambda: y.copy_(x), reps=10)
    return 2 * x.numel() / ms / 1e6


def build(preset: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    with torch.device("cuda"):
        return Transformer(ModelConfig.preset(preset)).to(torch.bfloat16).eval()


def step_bytes(model: Transformer, batch: int, context: int) -> int:
    """Bytes a decode step must read: every weight but the embedding table, the MTP module and the
    routed experts no token of the batch picks (expected distinct experts under uniform routing),
    plus the latent cache of every sequence."""
    c = model.config
    skip = {id(p) for p in model.mtp.parameters()} | {id(model.model.embed_tokens.weight)}
    routed = [m.experts for _, m in model.moe_layers() if _ < c.num_hidden_layers]
    routed_ids = {id(p) for e in routed for p in e.parameters()}
    fixed = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip | routed_ids)
    per_expert = sum(p.numel() * p.element_size() for p in routed[0].parameters()) // c.n_routed_experts
    E, K = c.n_routed_experts, c.num_experts_per_tok
    distinct = E * (1 - (1 - K / E) ** batch)
    return int(fixed + len(routed) * distinct * per_expert + batch * context * c.kv_cache_bytes_per_token(2))


def hf_model(model: Transformer, tmp: Path):
    from transformers import AutoModelForCausalLM

    model.save_pretrained(tmp / "ckpt")
    return AutoModelForCausalLM.from_pretrained(tmp / "ckpt", dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()


def hf_ms_per_token(hf, ids, new: int, static: bool) -> float:
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"
    for _ in range(2):  # warm-up (and compile, for the static cache)
        hf.generate(ids, **kw)
    torch.cuda.synchronize()
    t = time.perf_counter()
    hf.generate(ids, **kw)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) * 1e3 / new


def engine_for(model, max_num_seqs: int, max_len: int, **kw):
    from moeco.serve.engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(max_num_seqs=max_num_seqs, max_model_len=max_len, max_num_batched_tokens=8192,
                                  gpu_memory_utilization=0.5, **kw), model=model)


def section_compiled(args, model) -> dict:
    from moeco.serve.bench_throughput import measure

    ids = torch.randint(0, model.config.vocab_size, (1, args.prompt)).tolist()
    out = {}
    for name, kw in (("plain", {}), ("compiled", {"compile": True})):
        t = time.perf_counter()
        engine = engine_for(model, 8, args.prompt + args.new + 64, **kw)
        r = measure(engine, ids, args.new)
        out[name + "_ms"] = r["mean_tpot_ms"]
        out[name + "_setup_s"] = time.perf_counter() - t - r["elapsed_s"]
        del engine
        torch.cuda.empty_cache()
    return out


def section_spec(args) -> dict:
    from moeco.serve.bench_throughput import measure
    from moeco.serve.engine import EngineConfig, LLMEngine
    from moeco.train.corpus import embedded_corpus

    out = {"model": args.spec_model}
    for name, spec in (("plain", None), ("mtp", "mtp")):
        engine = LLMEngine(EngineConfig(model_dir=args.spec_model, max_num_seqs=4, speculative=spec,
                                        gpu_memory_utilization=0.3))
        text = "\n".join(embedded_corpus())
        g = torch.Generator().manual_seed(0)
        starts = torch.randint(0, len(text) - 2000, (8,), generator=g).tolist()
        prompts = [engine.tokenizer.encode(text[s:s + 400]).ids[:64] for s in starts]
        rows = [measure(engine, [p], 128, warmup=(i == 0)) for i, p in enumerate(prompts)]
        out[name + "_tpot_ms"] = sum(r["mean_tpot_ms"] for r in rows) / len(rows)
        if spec:
            out["acceptance_rate"] = engine.spec.accepted / max(engine.spec.proposed, 1)
            out["tokens_per_step"] = 1 + out["acceptance_rate"]
        del engine
    out["speedup"] = out["plain_tpot_ms"] / out["mtp_tpot_ms"]
    return out


def section_decode(args, model, floor, tmp) -> dict:
    from moeco.serve.bench_throughput import measure

    P, N = args.prompt, args.new
    ids = torch.randint(0, model.config.vocab_size, (1, P), device="cuda")
    generate(model, ids, 8)
    torch.cuda.synchronize()
    t = time.perf_counter()
    generate(model, ids, N)
    torch.cuda.synchronize()
    ref_ms = (time.perf_counter() - t) * 1e3 / N
    engine = engine_for(model, 8, P + N + 64)
    r = measure(engine, ids.tolist(), N)
    eng_ms = r["mean_tpot_ms"]
    nbytes = step_bytes(model, 1, P + N // 2)
    out = {"prompt": P, "new_tokens": N, "generate_ms": ref_ms, "engine_ms": eng_ms,
           "engine_tokens_per_s": 1e3 / eng_ms, "step_bytes": nbytes, "engine_gbps": nbytes / eng_ms / 1e6,
           "floor_ms": nbytes / floor / 1e6, "engine_vs_floor": eng_ms / (nbytes / floor / 1e6)}
    del engine
    if args.hf:
        hf = hf_model(model, tmp)
        out["hf_default_ms"] = hf_ms_per_token(hf, ids, N, static=False)
        try:
            out["hf_static_ms"] = hf_ms_per_token(hf, ids, N, static=True)
        except Exception as exc:  # report, don't hide: the row says why it is missing
            out["hf_static_error"] = f"{type(exc).__name__}: {exc}"[:300]
        del hf
    return out


def section_throughput(args, model, tmp) -> dict:
    from moeco.serve.bench_throughput import measure

    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, model.config.vocab_size, (args.requests, args.tin), generator=g).tolist()
    engine = engine_for(model, args.requests, args.tin + args.tout + 64)
    r = measure(engine, prompts, args.tout)
    del engine
    torch.cuda.empty_cache()
    out = {"requests": args.requests, "in": args.tin, "out": args.tout, "engine": r}
    if args.hf:
        hf = hf_model(model, tmp)
        ids = torch.tensor(prompts[:32], device="cuda")
        for static in (False, True):
            key = "hf_static_b32" if static else "hf_default_b32"
            try:
                ms = hf_ms_per_token(hf, ids, args.tout, static)
                out[key + "_tokens_per_s"] = 32 * 1e3 / ms
            except Exception as exc:
                out[key + "_error"] = f"{type(exc).__name__}: {exc}"[:300]
        del hf
    return out


def section_kernel(floor) -> dict:
    from moeco.serve.kernels import paged_mla_decode, paged_mla_decode_reference

    B, ctx, H, C, R, page = 64, 4096, 128, 512, 64, 64
    nb = ctx // page
    pool = torch.randn((B * nb + 1) * page, C + R, device="cuda", dtype=torch.bfloat16)
    tables = torch.randperm(B * nb, device="cuda").view(B, nb)
    pos = torch.full((B, 1), ctx - 1, device="cuda")
    ql = torch.randn(B, 1, H, C, device="cuda", dtype=torch.bfloat16)
    qr = torch.randn(B, 1, H, R, device="cuda", dtype=torch.bfloat16)
    scale = 192 ** -0.5
    got = paged_mla_decode(ql, qr, pool, tables, pos, scale, page)
    want = paged_mla_decode_reference(ql, qr, pool, tables, pos, scale, page)
    err = ((got - want).norm() / want.norm()).item()
    k_ms = gpu_ms(lambda: paged_mla_decode(ql, qr, pool, tables, pos, scale, page), reps=20)
    r_ms = gpu_ms(lambda: paged_mla_decode_reference(ql, qr, pool, tables, pos, scale, page), reps=5)
    nbytes = B * ctx * (C + R) * 2 + B * H * (C + R) * 2 + B * H * C * 4
    return {"batch": B, "context": ctx, "heads": H, "kernel_ms": k_ms, "reference_ms": r_ms,
            "kernel_gbps": nbytes / k_ms / 1e6, "pct_of_floor": 100 * nbytes / k_ms / 1e6 / floor,
            "pct_of_4800": 100 * nbytes / k_ms / 1e6 / 4800, "rel_err_vs_reference": err}


def section_capacity(model) -> dict:
    from moeco.serve.block_manager import BlockManager
    from moeco.serve.sequence import Sequence
    from moeco.serve.sampling_params import SamplingParams

    c = model.config
    per_token = c.kv_cache_bytes_per_token(2)
    block = 64
    blocks = int(100e9 // (per_token * block))
    pool = torch.empty(blocks * block * per_token, dtype=torch.uint8, device="cuda")  # the pool really fits
    del pool
    torch.cuda.empty_cache()
    bm = BlockManager(blocks, block)
    n = 0
    while True:  # distinct random prompts: no prefix sharing
        seq = Sequence(str(n), torch.randint(0, c.vocab_size, (4096,)).tolist(), 4096, SamplingParams(), n)
        if not bm.admit(seq, 4096):
            break
        n += 1
    L, H = c.num_hidden_layers, c.num_attention_heads
    mha = L * H * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * 2
    gqa = L * (H // 8 or 1) * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * 2
    return {"latent_bytes_per_token": per_token, "sequences_4096_latent": n,
            "mha_bytes_per_token": mha, "sequences_4096_mha": int(100e9 // (mha * 4096)),
            "gqa8_bytes_per_token": gqa, "sequences_4096_gqa8": int(100e9 // (gqa * 4096))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small")
    ap.add_argument("--only", default="floor,kernel,capacity,decode,throughput,compiled,spec")
    ap.add_argument("--spec-model", default="runs/tiny/model")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--tin", type=int, default=512)
    ap.add_argument("--tout", type=int, default=256)
    ap.add_argument("--no-hf", dest="hf", action="store_false")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    only = set(args.only.split(","))
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    floor = floor_gbps()
    res["floor_gbps"] = floor
    print(f"copy bandwidth {floor:.0f} GB/s", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save():
        (out / "serve_gpu.json").write_text(json.dumps(res, indent=1))

    with tempfile.TemporaryDirectory() as tmp:
        if "kernel" in only:
            res["kernel"] = section_kernel(floor)
            print("kernel", res["kernel"], flush=True)
            save()
        model = build(args.preset)
        if "capacity" in only:
            res["capacity"] = section_capacity(model)
            print("capacity", res["capacity"], flush=True)
            save()
        if "decode" in only:
            res["decode"] = section_decode(args, model, floor, Path(tmp))
            print("decode", res["decode"], flush=True)
            save()
        if "throughput" in only:
            res["throughput"] = section_throughput(args, model, Path(tmp))
            print("throughput", res["throughput"], flush=True)
            save()
        if "compiled" in only:
            try:
                res["compiled"] = section_compiled(args, model)
            except Exception as exc:  # the row says why it is missing
                res["compiled"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print("compiled", res["compiled"], flush=True)
            save()
        if "spec" in only and Path(args.spec_model).is_dir():
            try:
                res["spec"] = section_spec(args)
            except Exception as exc:
                res["spec"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            print("spec", res["spec"], flush=True)
            save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
