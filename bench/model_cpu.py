"""CPU benchmark: moeco vs transformers' DeepseekV3ForCausalLM on the same weights, in the same run.

Measures prefill tokens/s (one forward over the prompt) with its GFLOP/s against an fp32 matmul
measured in the same run (the practical compute ceiling of these cores), decode tokens/s (greedy
generate with the cache) and cache bytes per token, and prints the ratios. Usage:

    python bench/model_cpu.py [--batch 4] [--prompt 256] [--new 64] [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

import moeco  # noqa: E402

# A DeepSeek-V3-shaped model that a 2-core CPU runs in seconds: 8 layers (1 dense), 32 experts in
# 8 groups, top-4 within 4 groups, 1 shared expert, MLA with latent 128 + rope 32.
BENCH_CONFIG = dict(
    vocab_size=8192, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
    num_hidden_layers=8, num_attention_heads=8, q_lora_rank=256, kv_lora_rank=128,
    qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32,
    n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1, n_group=8, topk_group=4,
    max_position_embeddings=4096, num_nextn_predict_layers=0,
)


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def hf_cache_bytes_per_token(hf, ids) -> float:
    with torch.no_grad():
        out = hf(ids, use_cache=True)
    cache = out.past_key_values if hasattr(out, "past_key_values") and out.past_key_values is not None else out.cache
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total / (ids.shape[0] * ids.shape[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import transformers

    cfg = moeco.ModelConfig(**BENCH_CONFIG)
    torch.manual_seed(0)
    model = moeco.Transformer(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt))
    with torch.no_grad():
        err = (model(ids[:1, :32]).logits - hf(ids[:1, :32]).logits).abs().max().item()

    prefill_tokens = args.batch * args.prompt
    with torch.no_grad():
        t_moeco = best_of(lambda: model(ids, last_only=True), args.repeats)
        t_hf = best_of(lambda: hf(ids, logits_to_keep=1), args.repeats)
    prompt = ids[:, :args.prompt]
    decode_moeco = best_of(lambda: generate(model, prompt, args.new), 1)
    decode_hf = best_of(lambda: hf.generate(prompt, max_new_tokens=args.new, min_new_tokens=args.new,
                                            do_sample=False, eos_token_id=None, pad_token_id=0,
                                            attention_mask=torch.ones_like(prompt)), 1)
    # decode time = generate time minus the prefill it contains
    dec_tok = args.batch * (args.new - 1)
    moeco_dec = dec_tok / max(decode_moeco - t_moeco, 1e-9)
    hf_dec = dec_tok / max(decode_hf - t_hf, 1e-9)
    moeco_cache = model.new_cache(1, 1).bytes_per_token()
    # compute ceiling: a large fp32 matmul; prefill FLOPs: the planner's forward count minus the head
    # on all but the last token (both runs compute logits for the last position only)
    from moeco.plan.costs import forward_flops_per_token

    a = torch.randn(2048, 2048)
    peak = 2 * 2048**3 / best_of(lambda: a @ a, 5) / 1e9
    head = 2 * cfg.vocab_size * cfg.hidden_size
    flops = (forward_flops_per_token(cfg, seq_len=args.prompt) - head) * prefill_tokens + head * args.batch
    hf_cache = hf_cache_bytes_per_token(hf, ids[:1, :16])

    print(f"# moeco vs transformers {transformers.__version__}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {args.threads} threads, fp32, "
          f"{model.num_params() / 1e6:.1f}M params, max |logit diff| {err:.1e}")
    print(f"# batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, best of {args.repeats}")
    print(f"# fp32 matmul 2048^3 in the same run: {peak:.0f} GFLOP/s (the ceiling for the prefill row)")
    print(f"{'metric':32s} {'moeco':>12s} {'transformers':>14s} {'ratio':>8s}")
    print(f"{'prefill tokens/s':32s} {prefill_tokens / t_moeco:12.0f} {prefill_tokens / t_hf:14.0f} "
          f"{t_hf / t_moeco:7.2f}x")
    g_m, g_h = flops / t_moeco / 1e9, flops / t_hf / 1e9
    print(f"{'prefill GFLOP/s (% of matmul)':32s} {f'{g_m:.0f} ({g_m / peak:.0%})':>12s} "
          f"{f'{g_h:.0f} ({g_h / peak:.0%})':>14s}")
    print(f"{'decode tokens/s':32s} {moeco_dec:12.1f} {hf_dec:14.1f} {moeco_dec / hf_dec:7.2f}x")
    print(f"{'cache bytes/token (fp32)':32s} {moeco_cache:12,d} {hf_cache:14,.0f} {hf_cache / moeco_cache:7.2f}x")


if __name__ == "__main__":
    main()
