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
the first three are dense); we follow it so the figures reproduce, and say so. Given a compute time c
per layer and micro-batch and an overlap fraction f, the per-micro-batch time is the EP step's below
(`ep_step`, with comm = transfer): c = 100 us at f = 1 is hidden (14.76 ms), at f = 0 it is not
(61 x 2 x (100 + 120.96) us = 26.96 ms: the compute alone plus the full 14.76 ms of transfer).

EP step from measured inputs (`ep_step`, `moeco plan ep-step`). A step (a forward, or a forward and
its backward) spends c on compute (everything on the critical path that is not communication) and
sends b_intra bytes inside nodes and b_inter between them (the dispatchers' byte counters: bytes this
rank sent to other ranks) over links measured at B_intra and B_inter (an all-to-all of the step's
payload size: bytes sent to other ranks / time); f in [0, 1] is the share of the communication
hidden under compute. Hiding needs compute to hide under, so at most min(comm, c) is hidden:

    comm   = b_intra / B_intra + b_inter / B_inter        links one after the other ("serial": one host's
                                                           loopback, or two hops in turn as moeco's two-hop)
           = max(b_intra / B_intra, b_inter / B_inter)    "concurrent": NVLink and IB at once (routing.py)
    hidden = min(f x comm, c)
    step   = c + comm - hidden  =  max(c + (1 - f) comm, comm)

    c = 10 ms, 30 MB at 15 GB/s + 12 MB at 4 GB/s      comm = 2 + 3 = 5 ms (concurrent: 3 ms)
      f = 0 / 0.6 / 1                                  step = 15 / 12 / 10 ms
    c = 2 ms, same bytes, f = 0.2 / 0.6 / 1            step = 6 / 5 / 5 ms   (comm-bound: at most 2 ms hidden)

f = 0 is the plain schedule (every all-to-all waited on when issued), f = 1 the paper's assumption
(step = max(compute, comm)); a measured f comes from the overlap's spans (moeco.parallel.overlap:
in flight / (in flight + blocked), an upper bound). bench/overlap.py compares the prediction with the
measured step.

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


LINKS = ("serial", "concurrent")


def _overlapped(compute: float, comm: float, overlap: float) -> float:
    return compute + comm - min(overlap * comm, compute)


def ep_step(compute_ms: float, intra_bytes: float = 0, inter_bytes: float = 0, intra_gbs: float | None = None,
            inter_gbs: float | None = None, overlap: float = 0.0, links: str = "serial") -> dict:
    """Predicted time of one EP step from measured compute, bytes, link bandwidths and overlap fraction."""
    for name, value in (("compute-ms", compute_ms), ("intra-bytes", intra_bytes), ("inter-bytes", inter_bytes)):
        if not value >= 0:
            raise ConfigError(f"--{name} = {value} is invalid: must be >= 0")
    for name, bw, nbytes in (("intra-gbs", intra_gbs, intra_bytes), ("inter-gbs", inter_gbs, inter_bytes)):
        if bw is None and nbytes > 0:
            raise ConfigError(f"--{name} is missing: {nbytes:,.0f} bytes cross that link: give its measured GB/s")
        if bw is not None and not bw > 0:
            raise ConfigError(f"--{name} = {bw} is invalid: a bandwidth in GB/s, > 0")
    if not 0 <= overlap <= 1:
        raise ConfigError(f"--overlap = {overlap} is invalid: the share of communication hidden, in [0, 1]")
    if links not in LINKS:
        raise ConfigError(f"--links = {links!r} is invalid: choose serial or concurrent")
    intra_ms = intra_bytes / (intra_gbs * 1e9) * 1e3 if intra_bytes else 0.0
    inter_ms = inter_bytes / (inter_gbs * 1e9) * 1e3 if inter_bytes else 0.0
    comm_ms = intra_ms + inter_ms if links == "serial" else max(intra_ms, inter_ms)
    step_ms = _overlapped(compute_ms, comm_ms, overlap)
    return {
        "compute_ms": compute_ms, "intra_bytes": intra_bytes, "inter_bytes": inter_bytes,
        "intra_gbs": intra_gbs, "inter_gbs": inter_gbs, "overlap": overlap, "links": links,
        "intra_ms": intra_ms, "inter_ms": inter_ms, "comm_ms": comm_ms,
        "hidden_ms": compute_ms + comm_ms - step_ms,
        "exposed_comm_ms": step_ms - compute_ms,
        "step_ms": step_ms,
        "step_ms_no_overlap": _overlapped(compute_ms, comm_ms, 0.0),
        "step_ms_full_overlap": _overlapped(compute_ms, comm_ms, 1.0),
        "bound": "communication" if comm_ms > compute_ms else "compute",
    }


def ep_comm_limit(hidden: int, layers: int, bandwidth_gbs: float, tokens_per_device: int = 32,
                  experts_per_token: int = 9, dispatch_bytes: float = 1, combine_bytes: float = 2,
                  micro_batches: int = 2, compute_us: float | None = None, overlap: float = 1.0) -> dict:
    """The paper's bound; `compute_us` (per layer and micro-batch) and `overlap` give `ep_step`'s time per
    micro-batch instead of the transfer alone (None and 1: compute fully hidden, the paper's figures)."""
    for name, value in (("hidden", hidden), ("layers", layers), ("bandwidth", bandwidth_gbs),
                        ("tokens-per-device", tokens_per_device), ("experts-per-token", experts_per_token),
                        ("micro-batches", micro_batches)):
        if value <= 0:
            raise ConfigError(f"--{name} = {value} is invalid: must be positive")
    if dispatch_bytes < 0 or combine_bytes < 0 or dispatch_bytes + combine_bytes == 0:
        raise ConfigError("--dispatch-bytes and --combine-bytes must be >= 0 and not both 0")
    if not 0 <= overlap <= 1:
        raise ConfigError(f"--overlap = {overlap} is invalid: the share of communication hidden, in [0, 1]")
    if compute_us is None and overlap < 1:
        raise ConfigError(f"--overlap = {overlap} needs --compute-us (compute per layer and micro-batch): "
                          "without it the compute is assumed fully hidden")
    if compute_us is not None and not compute_us >= 0:
        raise ConfigError(f"--compute-us = {compute_us} is invalid: must be >= 0")
    step_bytes = (dispatch_bytes + combine_bytes) * tokens_per_device * experts_per_token * hidden
    transfer_us = step_bytes / (bandwidth_gbs * 1e9) * 1e6
    micro_batch_us = transfer_us if compute_us is None else _overlapped(compute_us, transfer_us, overlap)
    layer_us = micro_batches * micro_batch_us
    tpot_ms = layers * layer_us / 1e3
    return {
        "hidden": hidden, "layers": layers, "bandwidth_gbs": bandwidth_gbs,
        "tokens_per_device": tokens_per_device, "experts_per_token": experts_per_token,
        "dispatch_bytes": dispatch_bytes, "combine_bytes": combine_bytes, "micro_batches": micro_batches,
        "compute_us": compute_us, "overlap": overlap,
        "bytes_per_step": step_bytes,
        "transfer_us": transfer_us,
        "micro_batch_us": micro_batch_us,
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
