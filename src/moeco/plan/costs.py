"""Model costs: parameters, KV-cache bytes and FLOPs per token (ISCA Tables 1 and 2).

Notation: d hidden, L layers, n_h query heads, n_kv KV heads, h head size, V vocabulary,
d_c KV latent (kv_lora_rank), d_r decoupled RoPE key (qk_rope_head_dim), d'_c query latent,
d_qk = d_nope + d_r, d_v value head size, s sequence length. Matmul weights only (no norms, no
biases). A SwiGLU of width I holds 3 d I weights.

Attention projections per layer
    MLA  q: d d'_c + d'_c n_h d_qk  (or d n_h d_qk without query compression)
         kv: d (d_c + d_r) + d_c n_h (d_nope + d_v)       o: n_h d_v d
    GQA  q: d n_h h    k, v: 2 d n_kv h                    o: n_h h d

KV-cache bytes per token (Table 1; b = 2 for BF16, 1 for FP8, scales ignored)
    MLA  L (d_c + d_r) b                 V3: 61 x 576 x 2      = 70,272
    GQA  2 L n_kv h b                    Qwen2.5-72B: 2x80x8x128x2 = 327,680; Llama-3.1-405B 516,096

FLOPs per token (Table 2, facts §3: the convention that reproduces both DeepSeek rows)
    P_mm     active matmul weights incl. lm_head, excl. the input embedding (a lookup), excl. MTP
    forward  2 P_mm + L s n_h (d_qk + d_v)           causal: QK^T and A.V over on average s/2 keys
    train    6 P_mm + 3 L s n_h (d_qk + d_v)          V3 250.45 GFLOP, V2 155.31 GFLOP at s = 4096
GQA uses the same formula with d_qk = d_v = h (the n_kv sharing saves memory, not FLOPs).
With causal=False the attention term doubles (Megatron's count; V3 281.2 GFLOP).

MTP (not in Table 2; what a training step also runs, so MFU counts it). Depth k = 1..D runs one
decoder layer, eh_proj (2d -> d) and the shared head on the first n_k = s - k positions:
    forward_mtp  sum_k (n_k / s) [2 (P_mtp + P_head) + n_k n_h (d_qk + d_v)]   (causal; 2 n_k ... without)
with P_mtp one MTP layer's active matmul weights (param_counts.mtp_active / D): V3 at s = 4096 adds
3.40 GFLOP forward, 10.19 in training, to Table 2's 250.45 (260.64 in all).
"""

from __future__ import annotations

from dataclasses import dataclass

from moeco.errors import ConfigError
from moeco.plan.arch import Arch, load_arch

KV_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by part, whole model (layers summed). `*_active` is what one token touches."""
    embedding: int
    head: int  # 0 when tied (the embedding matrix is the head)
    attn_proj: int
    dense_mlp: int
    routed_total: int  # all routed experts + gates
    routed_active: int  # K experts + gates
    shared: int
    mtp_total: int  # DeepSeek MTP modules, excluding the shared embedding and head
    mtp_active: int

    @property
    def total(self) -> int:
        return self.embedding + self.head + self.attn_proj + self.dense_mlp + self.routed_total + self.shared

    @property
    def active(self) -> int:
        return self.embedding + self.head + self.attn_proj + self.dense_mlp + self.routed_active + self.shared

    @property
    def non_expert(self) -> int:
        """Everything but the routed experts (kept whole on each expert-parallel rank)."""
        return self.total - self.routed_total


def _swiglu(d: int, width: int) -> int:
    return 3 * d * width


def attn_proj_params_per_layer(a: Arch) -> int:
    d, n_h = a.hidden_size, a.num_attention_heads
    if a.attention == "mla":
        q = d * a.q_lora_rank + a.q_lora_rank * n_h * a.qk_head_dim if a.q_lora_rank else d * n_h * a.qk_head_dim
        kv = d * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * n_h * (a.qk_nope_head_dim + a.v_head_dim)
        return q + kv + n_h * a.v_head_dim * d
    h = a.head_dim
    return d * n_h * h + 2 * d * a.num_key_value_heads * h + n_h * h * d


def moe_layer_params(a: Arch, active: bool) -> int:
    """Routed experts (all, or the K a token uses) plus the gate, for one MoE layer."""
    if not a.n_moe_layers:
        return 0
    experts = a.num_experts_per_tok if active else a.n_routed_experts
    return experts * _swiglu(a.hidden_size, a.moe_intermediate_size) + a.n_routed_experts * a.hidden_size


def param_counts(model) -> ParamCounts:
    a = load_arch(model)
    d = a.hidden_size
    attn = attn_proj_params_per_layer(a)
    shared_layer = _swiglu(d, a.shared_intermediate_size) if a.shared_intermediate_size else 0
    # DeepSeek MTP module: one full MoE layer + eh_proj (2d -> d); embedding and head are shared.
    mtp_layer_total = attn + moe_layer_params(a, False) + shared_layer + 2 * d * d
    mtp_layer_active = attn + moe_layer_params(a, True) + shared_layer + 2 * d * d
    return ParamCounts(
        embedding=a.vocab_size * d,
        head=0 if a.tie_word_embeddings else a.vocab_size * d,
        attn_proj=a.num_hidden_layers * attn,
        dense_mlp=a.n_dense_layers * _swiglu(d, a.intermediate_size),
        routed_total=a.n_moe_layers * moe_layer_params(a, False),
        routed_active=a.n_moe_layers * moe_layer_params(a, True),
        shared=a.n_moe_layers * shared_layer,
        mtp_total=a.mtp_layers * mtp_layer_total,
        mtp_active=a.mtp_layers * mtp_layer_active,
    )


def kv_bytes_per_token(model, kv_dtype: str = "bf16") -> int:
    a = load_arch(model)
    b = kv_dtype_bytes(kv_dtype)
    if a.attention == "mla":
        return a.num_hidden_layers * (a.kv_lora_rank + a.qk_rope_head_dim) * b
    return 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * b


def kv_dtype_bytes(kv_dtype: str) -> int:
    try:
        return KV_BYTES[kv_dtype]
    except KeyError:
        raise ConfigError(f"kv dtype {kv_dtype!r} is unknown; choose one of {', '.join(KV_BYTES)}") from None


# ---- FLOPs -------------------------------------------------------------------------------
def matmul_params_active(model) -> int:
    """P_mm: active matmul weights a token passes through (head in, embedding out, MTP out)."""
    p = param_counts(model)
    head = p.head or p.embedding  # a tied head is still a V x d matmul
    return head + p.attn_proj + p.dense_mlp + p.routed_active + p.shared


def attn_core_flops_forward(model, seq_len: int = 4096, causal: bool = True) -> float:
    """QK^T and A.V per token, all layers: 2 s n_h (d_qk + d_v) L, halved by the causal mask."""
    a = load_arch(model)
    if seq_len < 1:
        raise ConfigError(f"seq_len = {seq_len} is invalid: must be a positive integer")
    full = 2.0 * seq_len * a.num_attention_heads * (a.qk_head_dim + a.v_head_dim) * a.num_hidden_layers
    return full / 2 if causal else full


def forward_flops_per_token(config_or_arch, seq_len: int = 4096, causal: bool = True) -> float:
    """Forward FLOPs per token: 2 P_mm + causal attention core. Accepts a ModelConfig directly."""
    return 2.0 * matmul_params_active(config_or_arch) + attn_core_flops_forward(config_or_arch, seq_len, causal)


def train_flops_per_token(config_or_arch, seq_len: int = 4096, causal: bool = True, mtp: bool = False) -> float:
    """Forward + backward FLOPs per token (3x forward): 6 P_mm + 3 L s n_h (d_qk + d_v) when causal.

    V3 gives 250.45e9 at 4096 (Table 2, which leaves MTP out). mtp=True adds 3x the MTP modules'
    forward (mtp_forward_flops_per_token): what a training step runs, and what the trainer's MFU counts.
    """
    extra = mtp_forward_flops_per_token(config_or_arch, seq_len, causal) if mtp else 0.0
    return 3.0 * (forward_flops_per_token(config_or_arch, seq_len, causal) + extra)


def mtp_forward_flops_per_token(config_or_arch, seq_len: int = 4096, causal: bool = True) -> float:
    """Forward FLOPs of the D MTP modules per token of the main sequence (0 without MTP); see the top."""
    a = load_arch(config_or_arch)
    if seq_len < 1:
        raise ConfigError(f"seq_len = {seq_len} is invalid: must be a positive integer")
    if not a.mtp_layers:
        return 0.0
    p = param_counts(a)
    layer_and_head = p.mtp_active / a.mtp_layers + (p.head or p.embedding)
    total = 0.0
    for k in range(1, a.mtp_layers + 1):
        n = seq_len - k
        if n <= 0:
            break
        core = 2.0 * n * a.num_attention_heads * (a.qk_head_dim + a.v_head_dim)
        total += n / seq_len * (2.0 * layer_and_head + (core / 2 if causal else core))
    return total


def flops_breakdown(model, seq_len: int = 4096, causal: bool = True) -> dict[str, dict[str, float]]:
    """Per part: active params and forward/train FLOPs per token (the embedding is a lookup: 0)."""
    p = param_counts(model)
    attn_core = attn_core_flops_forward(model, seq_len, causal)
    parts = {
        "embedding": (p.embedding, 0.0),
        "attn_proj": (p.attn_proj, 2.0 * p.attn_proj),
        "attn_core": (0, attn_core),
        "dense_mlp": (p.dense_mlp, 2.0 * p.dense_mlp),
        "routed": (p.routed_active, 2.0 * p.routed_active),
        "shared": (p.shared, 2.0 * p.shared),
        "head": (p.head, 2.0 * (p.head or p.embedding)),
    }
    return {k: {"params_active": v[0], "forward_flops": v[1], "train_flops": 3 * v[1]} for k, v in parts.items()}


def model_summary(model, seq_len: int = 4096, kv_dtype: str = "bf16") -> dict:
    """Everything `moeco plan model` prints, as one JSON-ready dict."""
    a = load_arch(model)
    p = param_counts(a)
    return {
        "model": a.name,
        "family": a.family,
        "attention": a.attention,
        "seq_len": seq_len,
        "kv_dtype": kv_dtype,
        "params_total": p.total,
        "params_active": p.active,
        "params_mtp": p.mtp_total,
        "params_mtp_active": p.mtp_active,
        "kv_cache_bytes_per_token": kv_bytes_per_token(a, kv_dtype),
        "train_flops_per_token": train_flops_per_token(a, seq_len),
        "forward_flops_per_token": forward_flops_per_token(a, seq_len),
        "breakdown": flops_breakdown(a, seq_len),
    }
