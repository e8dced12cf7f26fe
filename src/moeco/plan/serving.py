"""Disaggregated serving: prefill and decode throughput per GPU, and the prefill:decode ratio.

Notation: P the active matmul parameters, W the weight bytes (all parameters x w bytes), E experts of
which k per token, e the parameters of one expert, L_moe MoE layers, c the KV bytes per token,
I and O the input and output lengths, lambda the arrival rate (requests/s), F the peak FLOP/s at the
weight precision, BW the memory bandwidth; mfu and eff the fractions of each that are reached.

    gpus per worker  g = next power of 2 of W / (0.8 x memory)          (weights must fit)
    prefill          compute-bound:   tokens/s per worker = mfu x F x g / flops_per_token(I)
                     TTFT (no queue) = I / that
    decode, batch B  memory-bound step: every non-expert weight, each expert that at least one of the
                     B tokens picks (E (1 - (1 - k/E)^B) per MoE layer), and the B caches are read once:
                        bytes(B) = (W_non_expert + L_moe x E (1 - (1 - k/E)^B) x e x w) + B x c x (I + O/2)
                        step(B)  = max(bytes(B) / (eff x BW x g), 2 P B / (mfu x F x g))
                     B: the largest batch whose caches fit beside the weights and whose step meets the
                     TPOT SLO; tokens/s per worker = B / step(B)
    workers          prefill = ceil(lambda I / prefill tokens/s), decode = ceil(lambda O / decode tokens/s)
    balance          decode GPUs per prefill GPU at any load = (O / decode tokens/s) / (I / prefill tokens/s)
    hand-over        c x I bytes per request, over a link of handover_gbs GB/s

Single-worker figures with ideal scaling inside a worker (no TP/EP communication term): a first
sizing to check against measurements, not a substitute for them.
"""

from __future__ import annotations

import math

from moeco.errors import ConfigError
from moeco.plan.arch import load_arch
from moeco.plan.costs import _swiglu, forward_flops_per_token, kv_bytes_per_token, matmul_params_active, param_counts
from moeco.plan.hardware import Device

WEIGHT_BYTES = {"bf16": 2, "fp8": 1}


def decode_step_seconds(model, device: Device, batch: int, context: float, gpus: int = 1, precision: str = "fp8",
                        kv_dtype: str = "bf16", mfu: float = 0.4, bw_efficiency: float = 0.8) -> float:
    a, p, w = load_arch(model), param_counts(model), WEIGHT_BYTES[precision]
    expert = _swiglu(a.hidden_size, a.moe_intermediate_size) if a.is_moe else 0
    experts_read = a.n_routed_experts * (1 - (1 - a.num_experts_per_tok / a.n_routed_experts) ** batch) \
        if a.is_moe else 0
    weights = (p.total - p.routed_total - p.embedding + a.n_moe_layers * experts_read * expert) * w
    nbytes = weights + batch * kv_bytes_per_token(model, kv_dtype) * context
    memory_s = nbytes / (bw_efficiency * device.bandwidth_gbs * 1e9 * gpus)
    compute_s = 2 * matmul_params_active(model) * batch / (mfu * _flops(device, precision) * gpus)
    return max(memory_s, compute_s)


def _flops(device: Device, precision: str) -> float:
    tflops = device.fp8_tflops if precision == "fp8" and device.fp8_tflops else device.bf16_tflops
    return tflops * 1e12


def plan_serve(model, device: Device, rate: float, input_len: int, output_len: int, ttft_ms: float | None = None,
               tpot_ms: float | None = None, precision: str = "fp8", kv_dtype: str = "bf16", mfu: float = 0.4,
               bw_efficiency: float = 0.8, max_batch: int = 4096, handover_gbs: float = 50.0) -> dict:
    if precision not in WEIGHT_BYTES:
        raise ConfigError(f"precision {precision!r}; use one of {', '.join(WEIGHT_BYTES)}")
    if rate <= 0 or input_len < 1 or output_len < 1:
        raise ConfigError("rate, input and output lengths must be positive")
    if not handover_gbs > 0:
        raise ConfigError(f"handover_gbs = {handover_gbs}; give the hand-over link's GB/s (> 0), e.g. 50 for 400 Gb/s")
    if not (0 < mfu <= 1 and 0 < bw_efficiency <= 1):
        raise ConfigError(f"mfu = {mfu}, bw_efficiency = {bw_efficiency}; both must be in (0, 1]")
    a, p = load_arch(model), param_counts(model)
    weight_bytes = p.total * WEIGHT_BYTES[precision]
    gpus = 2 ** max(0, math.ceil(math.log2(weight_bytes / (0.8 * device.memory_gb * 1e9))))
    # prefill
    prefill_tps = mfu * _flops(device, precision) * gpus / forward_flops_per_token(model, seq_len=input_len)
    ttft = input_len / prefill_tps
    # decode: the largest batch that fits and meets the TPOT SLO
    context = input_len + output_len / 2
    kv_room = 0.9 * device.memory_gb * 1e9 * gpus - weight_bytes
    fit = int(kv_room // (kv_bytes_per_token(model, kv_dtype) * (input_len + output_len)))
    if fit < 1:
        raise ConfigError(f"{a.name} leaves no room for one request's cache on {gpus} x {device.name}")
    step = lambda b: decode_step_seconds(model, device, b, context, gpus, precision, kv_dtype, mfu, bw_efficiency)
    lo, hi = 1, min(fit, max_batch)
    if tpot_ms is not None:
        while lo < hi:  # step(B) grows with B: binary search for the largest B under the SLO
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if step(mid) * 1e3 <= tpot_ms else (lo, mid - 1)
    batch = hi if tpot_ms is None else lo
    decode_tps = batch / step(batch)
    n_prefill = max(1, math.ceil(rate * input_len / prefill_tps))
    n_decode = max(1, math.ceil(rate * output_len / decode_tps))
    g = math.gcd(n_prefill, n_decode)
    return {
        "model": a.name, "device": device.name, "precision": precision, "kv_dtype": kv_dtype,
        "gpus_per_worker": gpus, "rate": rate, "input_len": input_len, "output_len": output_len,
        "prefill_tokens_per_s_per_gpu": prefill_tps / gpus, "ttft_ms_no_queue": ttft * 1e3,
        "ttft_slo_met": None if ttft_ms is None else ttft * 1e3 <= ttft_ms,
        "decode_batch": batch, "decode_batch_fit": fit, "decode_step_ms": step(batch) * 1e3,
        "tpot_slo_met": None if tpot_ms is None else step(batch) * 1e3 <= tpot_ms,
        "decode_tokens_per_s_per_gpu": decode_tps / gpus,
        "prefill_workers": n_prefill, "decode_workers": n_decode,
        "ratio": f"{n_prefill // g}:{n_decode // g}",
        # load-independent balance: decode GPU-seconds per prefill GPU-second for one request
        "decode_per_prefill_gpu": (output_len / decode_tps) / (input_len / prefill_tps),
        "handover_bytes_per_request": kv_bytes_per_token(model, kv_dtype) * input_len,
        "handover_ms_per_request": kv_bytes_per_token(model, kv_dtype) * input_len / (handover_gbs * 1e9) * 1e3,
    }
