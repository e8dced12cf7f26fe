"""Speed bounds: the EP communication limit of decode (ISCA §2.3.2) and local decode (ISCA §2.2.2).

EP communication limit. Each GPU holds about one expert and decodes t tokens at a time; every token
is sent to k experts (8 routed + 1 shared), dispatched in b_d bytes per value (FP8: 1) and combined
in b_c (BF16: 2); d is the hidden size, B the link bandwidth per GPU, L the MoE layers, m the
micro-batches that take turns under dual micro-batch overlap (compute fully hidden, latency ignored):

    transfer  = (b_d + b_c) t k d / B                  (1 + 2) x 32 x 9 x 7000 / 50e9  = 120.96 us
    per layer = m x transfer                           2 x 120.96                      = 241.92 us
    TPOT      = L x per layer                          61 x 241.92 us                  = 14.76 ms
    tokens/s  = 1 / TPOT                               67.76 (paper prints 67)
    NVL72     B = 900 GB/s: 6.72 us, 0.82 ms, 1,219.75 tokens/s (paper: "approximately 1200")

The paper takes d = "7K" = 7000 (the real 7168 gives 123.86 us) and L = 61 (every layer, though
the first three are dense); we follow it so the figures reproduce, and say so.

Local decode bound. A single request reads every active weight once per token, plus its KV cache:

    bytes/token = P_active_read x w / 8 + kv_bytes_per_token x context
    tokens/s   <= efficiency x bandwidth / bytes/token

P_active_read counts the head but not the embedding (one row is read). With efficiency 1 this is
the hard bound; achieved memory bandwidth on LPDDR5X/DDR5 is typically 70-85% of peak, so we also
report it at `efficiency` (default 0.8). DeepSeek-V2 (21B active) at 4 bits on 256 GB/s: bound
24.5, expected ~19.6 tokens/s ("nearly 20 TPS"); Llama-3.1-70B: bound ~7 ("single digit").

Hybrid split (KTransformers-style): attention, dense MLPs, shared experts, head and KV on a GPU;
routed experts in host memory, read at host bandwidth. Per token the two run one after the other:

    time = bytes_gpu / bw_gpu + bytes_routed / bw_host
"""

from __future__ import annotations

from moeco.errors import ConfigError
from moeco.plan.arch import load_arch
from moeco.plan.costs import kv_bytes_per_token, param_counts
from moeco.plan.hardware import Device


def ep_comm_limit(hidden: int, layers: int, bandwidth_gbs: float, tokens_per_device: int = 32,
                  experts_per_token: int = 9, dispatch_bytes: float = 1, combine_bytes: float = 2,
                  micro_batches: int = 2) -> dict:
    for name, value in (("hidden", hidden), ("layers", layers), ("bandwidth", bandwidth_gbs),
                        ("tokens-per-device", tokens_per_device), ("experts-per-token", experts_per_token),
                        ("micro-batches", micro_batches)):
        if value <= 0:
            raise ConfigError(f"--{name} = {value} is invalid: must be positive")
    if dispatch_bytes < 0 or combine_bytes < 0 or dispatch_bytes + combine_bytes == 0:
        raise ConfigError("--dispatch-bytes and --combine-bytes must be >= 0 and not both 0")
    step_bytes = (dispatch_bytes + combine_bytes) * tokens_per_device * experts_per_token * hidden
    transfer_us = step_bytes / (bandwidth_gbs * 1e9) * 1e6
    layer_us = micro_batches * transfer_us
    tpot_ms = layers * layer_us / 1e3
    return {
        "hidden": hidden, "layers": layers, "bandwidth_gbs": bandwidth_gbs,
        "tokens_per_device": tokens_per_device, "experts_per_token": experts_per_token,
        "dispatch_bytes": dispatch_bytes, "combine_bytes": combine_bytes, "micro_batches": micro_batches,
        "bytes_per_step": step_bytes,
        "transfer_us": transfer_us,
        "layer_us": layer_us,
        "tpot_ms": tpot_ms,
        "tokens_per_s": 1e3 / tpot_ms,
    }


def _check_bits(weight_bits: float, efficiency: float, context: int) -> None:
    if not 1 <= weight_bits <= 32:
        raise ConfigError(f"--weight-bits = {weight_bits} is invalid: use 1..32 (4 for Q4, 8 for FP8, 16 for BF16)")
    if not 0 < efficiency <= 1:
        raise ConfigError(f"--efficiency = {efficiency} is invalid: a fraction of peak bandwidth in (0, 1]")
    if context < 0:
        raise ConfigError(f"--context = {context} is invalid: must be >= 0")


def local_decode(model, device: Device, weight_bits: float = 4, kv_dtype: str = "bf16", context: int = 4096,
                 efficiency: float = 0.8, gpu: Device | None = None) -> dict:
    """Single-request decode bound on one memory system, and the hybrid split when `gpu` is given."""
    _check_bits(weight_bits, efficiency, context)
    a = load_arch(model)
    p = param_counts(a)
    wb = weight_bits / 8
    read_params = p.active - p.embedding  # the embedding is a row lookup
    kv_read = kv_bytes_per_token(a, kv_dtype) * context
    bytes_per_token = read_params * wb + kv_read
    resident = p.total * wb + kv_read  # weights plus one sequence's cache
    bound = device.bandwidth_gbs * 1e9 / bytes_per_token
    out = {
        "model": a.name, "device": device.name, "bandwidth_gbs": device.bandwidth_gbs,
        "weight_bits": weight_bits, "kv_dtype": kv_dtype, "context": context, "efficiency": efficiency,
        "params_active_read": read_params,
        "bytes_per_token": bytes_per_token,
        "kv_bytes_read_per_token": kv_read,
        "tokens_per_s_bound": bound,
        "tokens_per_s": bound * efficiency,
        "memory_needed_gb": resident / 1e9,
        "memory_gb": device.memory_gb,
        "fits": resident / 1e9 <= device.memory_gb,
        "hybrid": None,
    }
    if gpu is not None:
        out["hybrid"] = hybrid_split(a, host=device, gpu=gpu, weight_bits=weight_bits, kv_dtype=kv_dtype,
                                     context=context, efficiency=efficiency)
    return out


def hybrid_split(model, host: Device, gpu: Device, weight_bits: float = 4, kv_dtype: str = "bf16",
                 context: int = 4096, efficiency: float = 0.8) -> dict:
    _check_bits(weight_bits, efficiency, context)
    a = load_arch(model)
    if not a.is_moe:
        raise ConfigError(f"the hybrid split puts routed experts in host memory; {a.name} has none (dense model)")
    p = param_counts(a)
    wb = weight_bits / 8
    kv_read = kv_bytes_per_token(a, kv_dtype) * context
    gpu_read = (p.active - p.embedding - p.routed_active) * wb + kv_read
    host_read = p.routed_active * wb
    gpu_resident = (p.non_expert) * wb + kv_read
    host_resident = p.routed_total * wb
    t_gpu = gpu_read / (gpu.bandwidth_gbs * 1e9)
    t_host = host_read / (host.bandwidth_gbs * 1e9)
    bound = 1.0 / (t_gpu + t_host)
    return {
        "gpu": gpu.name, "host": host.name,
        "gpu_bytes_per_token": gpu_read, "host_bytes_per_token": host_read,
        "gpu_ms_per_token": t_gpu * 1e3, "host_ms_per_token": t_host * 1e3,
        "gpu_memory_needed_gb": gpu_resident / 1e9, "gpu_memory_gb": gpu.memory_gb,
        "host_memory_needed_gb": host_resident / 1e9, "host_memory_gb": host.memory_gb,
        "fits": gpu_resident / 1e9 <= gpu.memory_gb and host_resident / 1e9 <= host.memory_gb,
        "tokens_per_s_bound": bound,
        "tokens_per_s": bound * efficiency,
    }
