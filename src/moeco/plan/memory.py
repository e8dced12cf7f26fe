"""Will it fit? Per-GPU memory for training and serving on a cluster of N nodes x G GPUs.

Layout. W = N G GPUs. Routed experts are split over an expert-parallel group of `ep` GPUs; all other
weights ("non-expert": attention, dense MLPs, shared experts, gates, embedding, head) are replicated
(serving: DP attention, as DeepSeek decodes; `tp` shards them instead). Training adds `pp` pipeline
stages (each holds L/pp of every part) and ZeRO-1: optimizer states sharded over the data-parallel
ranks that hold the same weights (W/pp for non-expert weights, W/(pp ep) for an expert shard).

Training, bytes per GPU (TR §3.3: BF16 moments, FP32 master weights and gradients):

    weights      P_gpu x w                w = 2 (bf16) or 1 (fp8: linear weights cached in FP8;
                                          embedding and head stay BF16)
    gradients    P_gpu x 4                FP32, kept whole on each rank (ZeRO-1 shards states only)
    optimizer    P_gpu x (4 + 2 + 2) / dp FP32 master + BF16 m + BF16 v, sharded over dp
    activations  L s a_tok               one micro-batch of s tokens per stage, pp in flight (1F1B)
                                          -> L/pp layers x s x pp = L s per GPU on the first stage
    a_tok (per token per layer; bytes: 2 for BF16, b = 1 with fp8 and 2 with bf16; E5M6 = 1.5):
      attention  2 d + 2 (d'_c + d_c + d_r) + 1.5 n_h d_v + 4 n_h   block input, latents, the W_O
                 input (E5M6 with fp8, else 2 B), softmax lse; q, k, v are recomputed from the
                 latents and norms from the block input (TR §3.2.3), so they are not stored
                 (GQA: 2 d + 2 (n_h + 2 n_kv) h + 2 n_h h + 4 n_h, nothing recomputed)
      MoE        2 d + 4 E + K b (d + 2 I_e + d) + b (2 I_s + d)    block input, router scores, per
                 expert copy its input, SwiGLU input and output (kept for the gate gradient)
      dense MLP  2 d + 2 (2 I + I)
    An estimate: real stacks differ by their recompute and overlap choices (DualPipe holds pp + 1).

Serving, bytes per GPU:

    weights      non-expert / tp + routed / ep   (w = 1 for fp8 linear weights, 2 for bf16;
                                                  embedding and head BF16)
    reserve      `reserve_frac` of memory for activations, CUDA context and fragmentation (10%)
    KV capacity  (memory - weights - reserve) / kv_bytes_per_token tokens per GPU; MLA's latent
                 cache is not split by tp (every tp rank needs the whole latent); GQA's is
                 split over min(tp, n_kv) (KV heads are replicated beyond n_kv)
    sequences    KV tokens x (W / tp) / context   concurrent sequences across the cluster

Verdict: fits when used <= memory; serving counts weights + reserve + one sequence's KV as used.
The smallest EP degree that fits is searched over divisors of the GPUs available to experts; when
none does, the smallest pp (train) or tp (serve) that fits at the widest EP is reported.
"""

from __future__ import annotations

from moeco.errors import ConfigError
from moeco.plan.arch import load_arch
from moeco.plan.costs import kv_bytes_per_token, param_counts
from moeco.plan.hardware import Device

GB = 1e9


def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def activation_bytes_per_token_layer(model, precision: str = "bf16") -> tuple[float, float]:
    """(MoE-or-attention layer, dense layer) stored activation bytes per token, see the header."""
    a = load_arch(model)
    b = 1 if precision == "fp8" else 2
    d, n_h = a.hidden_size, a.num_attention_heads
    if a.attention == "mla":
        out_bytes = 1.5 if precision == "fp8" else 2
        attn = 2 * d + 2 * ((a.q_lora_rank or 0) + a.kv_lora_rank + a.qk_rope_head_dim) \
            + out_bytes * n_h * a.v_head_dim + 4 * n_h
    else:
        attn = 2 * d + 2 * (n_h + 2 * a.num_key_value_heads) * a.head_dim + 2 * n_h * a.head_dim + 4 * n_h
    moe = 0.0
    if a.is_moe:
        moe = 2 * d + 4 * a.n_routed_experts + a.num_experts_per_tok * b * (2 * d + 2 * a.moe_intermediate_size)
        moe += b * (2 * a.shared_intermediate_size + d) if a.shared_intermediate_size else 0
    dense = 2 * d + 2 * 3 * a.intermediate_size
    return attn + moe, attn + dense


def _weight_bytes(params: int, embed_head: int, precision: str) -> float:
    linear_bytes = 1 if precision == "fp8" else 2
    return (params - embed_head) * linear_bytes + embed_head * 2


def fit_train(model, nodes: int, gpus: int, device: Device, precision: str = "bf16", context: int = 4096,
              pp: int = 1, ep: int | None = None, search: bool = True) -> dict:
    a = load_arch(model)
    p = param_counts(a)
    world = nodes * gpus
    if pp < 1 or world % pp or a.num_hidden_layers < pp:
        raise ConfigError(f"--pp = {pp} is invalid: must divide the {world} GPUs and be <= {a.num_hidden_layers} layers")
    if context < 1:
        raise ConfigError(f"--context = {context} is invalid: must be >= 1")
    dp = world // pp
    act_layer, act_dense = activation_bytes_per_token_layer(a, precision)
    acts = context * (a.n_moe_layers * act_layer + a.n_dense_layers * act_dense)  # L/pp layers x pp in flight

    def usage(ep_: int) -> dict:
        non_expert = p.non_expert / pp
        routed = p.routed_total / (pp * ep_) if a.is_moe else 0
        local = non_expert + routed
        embed_head = (p.embedding + p.head) / pp
        weights = _weight_bytes(int(local), embed_head, precision)
        grads = 4 * local
        optim = 8 * (non_expert / dp + (routed / (dp // ep_) if a.is_moe else 0))
        parts = {"weights": weights, "gradients": grads, "optimizer": optim, "activations": acts}
        return {k: v / GB for k, v in parts.items()}

    choices = [e for e in _divisors(dp) if a.is_moe and e <= a.n_routed_experts] or [1]
    chosen = ep or (max(choices) if a.is_moe else 1)
    if chosen not in choices:
        raise ConfigError(f"--ep = {chosen} is invalid: must divide the {dp} data-parallel ranks"
                          + (f" and be <= {a.n_routed_experts} experts" if a.is_moe else " (dense model: use 1)"))
    smallest = next((e for e in choices if sum(usage(e).values()) <= device.memory_gb), None)
    parts = usage(chosen)
    out = _verdict(a.name, "train", nodes, gpus, device, precision, context, chosen, smallest, parts,
                   {"pp": pp, "dp": dp})
    out["min_pp_that_fits"] = pp if out["fits"] else None if not search else _first_that_fits(
        [q for q in _divisors(world) if q > pp and q <= a.num_hidden_layers],
        lambda q: fit_train(a, nodes, gpus, device, precision, context, q, search=False)["fits"])
    return out


def _first_that_fits(candidates: list[int], fits) -> int | None:
    return next((c for c in candidates if fits(c)), None)


def fit_serve(model, nodes: int, gpus: int, device: Device, precision: str = "fp8", context: int = 4096,
              kv_dtype: str = "bf16", tp: int = 1, ep: int | None = None, reserve_frac: float = 0.1,
              with_mtp: bool = False, search: bool = True) -> dict:
    a = load_arch(model)
    p = param_counts(a)
    world = nodes * gpus
    if tp < 1 or world % tp or a.num_attention_heads % tp:
        raise ConfigError(f"--tp = {tp} is invalid: must divide the {world} GPUs and {a.num_attention_heads} heads")
    if not 0 <= reserve_frac < 1:
        raise ConfigError(f"reserve fraction {reserve_frac} is invalid: must be in [0, 1)")
    if context < 1:
        raise ConfigError(f"--context = {context} is invalid: must be >= 1")
    # GQA shards KV heads over tp (replicating them once tp > n_kv); MLA's one latent cannot be split
    kv_tok = kv_bytes_per_token(a, kv_dtype) / (1 if a.attention == "mla" else min(tp, a.num_key_value_heads))
    mtp = p.mtp_total if with_mtp else 0
    mtp_routed = (a.mtp_layers * (p.routed_total // max(a.n_moe_layers, 1))) if with_mtp and a.is_moe else 0
    reserve = reserve_frac * device.memory_gb

    def weights_gb(ep_: int) -> float:
        non_expert = (p.non_expert + mtp - mtp_routed) / tp
        routed = (p.routed_total + mtp_routed) / ep_ if a.is_moe else 0
        return _weight_bytes(int(non_expert + routed), (p.embedding + p.head) / tp, precision) / GB

    def used(ep_: int) -> float:
        return weights_gb(ep_) + reserve + kv_tok * context / GB

    choices = [e for e in _divisors(world) if a.is_moe and e <= a.n_routed_experts] or [1]
    chosen = ep or max(choices)
    if chosen not in choices:
        raise ConfigError(f"--ep = {chosen} is invalid: must divide the {world} GPUs"
                          + (f" and be <= {a.n_routed_experts} experts" if a.is_moe else " (dense model: use 1)"))
    smallest = next((e for e in choices if used(e) <= device.memory_gb), None)
    weights = weights_gb(chosen)
    free = max(0.0, device.memory_gb - weights - reserve)
    kv_tokens = int(free * GB // kv_tok)
    parts = {"weights": weights, "reserve": reserve, "kv_one_sequence": kv_tok * context / GB}
    out = _verdict(a.name, "serve", nodes, gpus, device, precision, context, chosen, smallest,
                   parts, {"tp": tp, "kv_dtype": kv_dtype, "with_mtp": with_mtp})
    out["kv_capacity_gb"] = kv_tokens * kv_tok / GB
    out["min_tp_that_fits"] = tp if out["fits"] else None if not search else _first_that_fits(
        [t for t in _divisors(world) if t > tp and a.num_attention_heads % t == 0],
        lambda t: fit_serve(a, nodes, gpus, device, precision, context, kv_dtype, t, None, reserve_frac,
                            with_mtp, search=False)["fits"])
    out["kv_tokens_per_gpu"] = kv_tokens
    out["kv_tokens_total"] = kv_tokens * (world // tp)
    out["concurrent_sequences"] = kv_tokens * (world // tp) // context
    return out


def _verdict(name, mode, nodes, gpus, device, precision, context, ep, smallest, parts, extra) -> dict:
    used = sum(parts.values())
    return {
        "model": name, "mode": mode, "cluster": f"{nodes}x{gpus}x{device.name}", "nodes": nodes,
        "gpus_per_node": gpus, "device": device.name, "memory_gb": device.memory_gb, "precision": precision,
        "context": context, "ep": ep, **extra,
        "per_gpu_gb": parts, "used_gb": used,
        "fits": used <= device.memory_gb, "margin_gb": device.memory_gb - used,
        "min_ep_that_fits": smallest,
    }
