"""Arch: one normalized description of a decoder-only LM, read from any common HF config.json.

The planner needs only shapes, so every family is reduced to the same few numbers:

    attention  "mla" (DeepSeek V2/V3: latent KV, decoupled RoPE key) or "gqa" (Llama, Qwen, Mixtral;
               MHA is GQA with n_kv = n_h)
    FFN        n_dense_layers x SwiGLU(d -> intermediate_size) and
               n_moe_layers x [gate (E x d) + E routed experts of moe_intermediate_size, K active
               + a shared SwiGLU of shared_intermediate_size (DeepSeek, Qwen2-MoE; 0 otherwise)]
    vocab      embedding V x d, head V x d (the same matrix when tie_word_embeddings)
    MTP        DeepSeek's multi-token-prediction modules, kept apart (mtp_layers)

Families and the HF keys each is read from:

    deepseek_v2, deepseek_v3, kimi_k2  -> moeco.ModelConfig.from_hf (its validation applies)
    llama, mistral, qwen2, qwen3       dense GQA: num_key_value_heads (default n_h), head_dim
                                       (default hidden_size / n_h)
    qwen3_moe                          num_experts, num_experts_per_tok, moe_intermediate_size,
                                       decoder_sparse_step, mlp_only_layers (dense layers)
    qwen2_moe                          as qwen3_moe + shared_expert_intermediate_size
    mixtral                            num_local_experts, num_experts_per_tok; every layer MoE and
                                       intermediate_size is the expert size

Biases (Qwen2's q/k/v bias) and norm weights are ignored everywhere: they are < 0.01% of the
parameters and no FLOPs that matter. An unknown model_type or an inconsistent field raises
`ConfigError` naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeco.config import PRESETS as DEEPSEEK_PRESETS
from moeco.config import ModelConfig, read_config_json
from moeco.errors import ConfigError


@dataclass(frozen=True)
class Arch:
    name: str
    family: str
    attention: str  # "mla" | "gqa"
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    # GQA head size (also v); for MLA see the latent fields
    head_dim: int
    # MLA (0 / None for GQA)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim_mla: int = 0
    # FFN
    intermediate_size: int = 0
    n_dense_layers: int = 0
    n_moe_layers: int = 0
    moe_intermediate_size: int = 0
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    shared_intermediate_size: int = 0
    n_group: int = 1
    topk_group: int = 1
    # vocab / extras
    tie_word_embeddings: bool = False
    mtp_layers: int = 0
    max_position_embeddings: int = 0

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0 and self.n_moe_layers > 0

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    @property
    def v_head_dim(self) -> int:
        return self.v_head_dim_mla if self.attention == "mla" else self.head_dim


# ---- non-DeepSeek presets, as their HF config.json (core shape keys only) -----------------
# Values from the models' published config.json files (facts file §1 for the first two).
EXTRA_PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-72b": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=8192, intermediate_size=29568,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        max_position_embeddings=32768, tie_word_embeddings=False,
    ),
    "llama-3.1-405b": dict(
        model_type="llama", vocab_size=128256, hidden_size=16384, intermediate_size=53248,
        num_hidden_layers=126, num_attention_heads=128, num_key_value_heads=8,
        max_position_embeddings=131072, tie_word_embeddings=False,
    ),
    "llama-3.1-70b": dict(
        model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
        max_position_embeddings=131072, tie_word_embeddings=False,
    ),
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=40960,
        tie_word_embeddings=False,
    ),
    "mixtral-8x7b": dict(
        model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=32768, tie_word_embeddings=False,
    ),
}

DEEPSEEK_TYPES = ("deepseek_v2", "deepseek_v3", "kimi_k2")
DENSE_TYPES = ("llama", "mistral", "qwen2", "qwen3")
MOE_TYPES = ("qwen3_moe", "qwen2_moe", "mixtral")
MODEL_TYPES = DEEPSEEK_TYPES + DENSE_TYPES + MOE_TYPES


def preset_names() -> list[str]:
    return [*DEEPSEEK_PRESETS, *EXTRA_PRESETS]


def load_arch(model: str | Path | dict | ModelConfig | Arch) -> Arch:
    """A preset name, a config.json path (or its directory), an HF dict, a ModelConfig or an Arch."""
    if isinstance(model, Arch):
        return model
    if isinstance(model, ModelConfig):
        return arch_from_model_config(model)
    if isinstance(model, dict):
        return arch_from_hf(model)
    text = str(model)
    if text in DEEPSEEK_PRESETS:
        return arch_from_model_config(ModelConfig.preset(text), name=text)
    if text in EXTRA_PRESETS:
        return arch_from_hf(EXTRA_PRESETS[text], name=text)
    raw, path = read_config_json(text, missing=f"model {text!r} is neither a preset ({', '.join(preset_names())}) "
                                                f"nor an existing config.json or directory holding one")
    return arch_from_hf(raw, name=path.parent.name or path.name)


def arch_from_model_config(cfg: ModelConfig, name: str = "deepseek") -> Arch:
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    return Arch(
        name=name, family="deepseek", attention="mla", vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_attention_heads,
        head_dim=cfg.v_head_dim, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_head_dim=cfg.qk_nope_head_dim, qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim_mla=cfg.v_head_dim, intermediate_size=cfg.intermediate_size,
        n_dense_layers=cfg.num_hidden_layers - n_moe, n_moe_layers=n_moe,
        moe_intermediate_size=cfg.moe_intermediate_size if n_moe else 0,
        n_routed_experts=cfg.n_routed_experts if n_moe else 0,
        num_experts_per_tok=cfg.num_experts_per_tok if n_moe else 0,
        shared_intermediate_size=cfg.n_shared_experts * cfg.moe_intermediate_size if n_moe else 0,
        n_group=cfg.n_group, topk_group=cfg.topk_group, tie_word_embeddings=cfg.tie_word_embeddings,
        mtp_layers=cfg.num_nextn_predict_layers, max_position_embeddings=cfg.max_position_embeddings,
    )


# ---- HF dicts of the other families -----------------------------------------------------
def _int(raw: dict, key: str, default: Any = ..., minimum: int = 1) -> int:
    if key not in raw or raw[key] is None:
        if default is ...:
            raise ConfigError(f"config field {key!r} is missing; an HF config.json of this family needs it")
        return default
    value = raw[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"config field {key!r} = {value!r} is invalid: must be an integer >= {minimum}")
    return value


def arch_from_hf(raw: dict, name: str | None = None) -> Arch:
    model_type = raw.get("model_type")
    if model_type is None and "kv_lora_rank" in raw:
        model_type = "deepseek_v3"
    if model_type in DEEPSEEK_TYPES:
        return arch_from_model_config(ModelConfig.from_hf(raw), name=name or str(model_type))
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"config field 'model_type' = {model_type!r} is not supported; "
                          f"the planner reads {', '.join(MODEL_TYPES)}")
    name = name or str(model_type)
    d = _int(raw, "hidden_size")
    layers = _int(raw, "num_hidden_layers")
    n_h = _int(raw, "num_attention_heads")
    n_kv = _int(raw, "num_key_value_heads", n_h)
    if n_h % n_kv:
        raise ConfigError(f"config field 'num_key_value_heads' = {n_kv} must divide "
                          f"num_attention_heads = {n_h} (GQA shares each KV head by a group of query heads)")
    if raw.get("head_dim") is None and d % n_h:
        raise ConfigError(f"config field 'hidden_size' = {d} is not divisible by num_attention_heads = {n_h}; "
                          f"set 'head_dim' explicitly")
    head_dim = _int(raw, "head_dim", d // n_h)
    common = dict(
        name=name, family=str(model_type), attention="gqa", vocab_size=_int(raw, "vocab_size"),
        hidden_size=d, num_hidden_layers=layers, num_attention_heads=n_h, num_key_value_heads=n_kv,
        head_dim=head_dim, tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=_int(raw, "max_position_embeddings", 0, minimum=0),
    )
    if model_type in DENSE_TYPES:
        return Arch(**common, intermediate_size=_int(raw, "intermediate_size"), n_dense_layers=layers)
    if model_type == "mixtral":
        experts, k = _int(raw, "num_local_experts"), _int(raw, "num_experts_per_tok")
        _check_topk(k, experts, "num_local_experts")
        return Arch(**common, n_moe_layers=layers, moe_intermediate_size=_int(raw, "intermediate_size"),
                    n_routed_experts=experts, num_experts_per_tok=k)
    # qwen3_moe / qwen2_moe
    experts, k = _int(raw, "num_experts"), _int(raw, "num_experts_per_tok")
    _check_topk(k, experts, "num_experts")
    step = _int(raw, "decoder_sparse_step", 1)
    dense_ids = raw.get("mlp_only_layers") or []
    if not isinstance(dense_ids, list) or any(not isinstance(i, int) or not 0 <= i < layers for i in dense_ids):
        raise ConfigError(f"config field 'mlp_only_layers' = {dense_ids!r} must list layer ids in [0, {layers})")
    n_moe = sum(1 for i in range(layers) if i not in dense_ids and (i + 1) % step == 0)
    n_dense = layers - n_moe
    shared = _int(raw, "shared_expert_intermediate_size", 0, minimum=0) if model_type == "qwen2_moe" else 0
    return Arch(**common, intermediate_size=_int(raw, "intermediate_size") if n_dense else 0,
                n_dense_layers=n_dense, n_moe_layers=n_moe,
                moe_intermediate_size=_int(raw, "moe_intermediate_size"), n_routed_experts=experts,
                num_experts_per_tok=k, shared_intermediate_size=shared)


def _check_topk(k: int, experts: int, experts_key: str) -> None:
    if k > experts:
        raise ConfigError(f"config field 'num_experts_per_tok' = {k} exceeds {experts_key} = {experts}")
