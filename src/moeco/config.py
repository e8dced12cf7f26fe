"""ModelConfig: a DeepSeek-V3-family model's shape, spelled as in a Hugging Face `config.json`.

Field names are exactly those of DeepSeek's `config.json` (and transformers' DeepseekV3Config), so a
config reads and writes without a translation table. `from_hf` accepts both the older spellings
DeepSeek ships (`rope_scaling`, `num_nextn_predict_layers`) and the transformers-5 ones
(`rope_parameters`, `num_mtp_layers`); `to_hf_dict` writes the older ones, which both read.

Every value is checked when the config is built; an invalid one raises `ConfigError` naming the
field, the value and what would be valid.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeco.errors import ConfigError

SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
ROPE_TYPES = ("default", "yarn")

# Keys of an HF config.json that moeco reads or deliberately ignores (runtime-only settings).
_IGNORED_HF_KEYS = {
    "architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "pretraining_tp", "attention_dropout", "ep_size", "output_router_logits",
    "num_local_experts", "qk_head_dim", "head_dim", "pad_token_id", "_name_or_path",
    "return_dict", "output_hidden_states", "output_attentions", "id2label", "label2id",
}



def read_config_json(source: str | Path, missing: str | None = None) -> tuple[dict, Path]:
    """(the JSON object, its path) of an HF config.json given as the file or the directory holding it.

    Every failure is a one-line ConfigError; `missing` replaces the message for a path that is not there.
    """
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(missing or f"config file {str(path)!r} does not exist; pass a config.json or its directory")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{str(path)!r} must hold a JSON object (an HF config.json)")
    return raw, path


@dataclass(frozen=True)
class ModelConfig:
    # sizes
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense FFN of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 2048  # one routed or shared expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # MLA: always num_attention_heads
    # Multi-head Latent Attention
    q_lora_rank: int | None = 1536  # None: no query compression (DeepSeek-V2-Lite)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # DeepSeekMoE
    n_routed_experts: int = 256
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    aux_loss_alpha: float = 0.0001  # sequence-wise balance loss weight (V3: 0.0001)
    seq_aux: bool = True
    # multi-token prediction
    num_nextn_predict_layers: int = 1
    # positions and norms
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # YaRN: {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rope_interleave: bool = True  # the checkpoint's rotary row layout (see moeco.checkpoint); the model always interleaves
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    initializer_range: float = 0.006
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    # passthrough (e.g. quantization_config of DeepSeek's FP8 release)
    quantization_config: dict | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:  # MLA: one latent serves every head
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        _validate(self)

    # ---- derived shapes -------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        """Values cached per token per layer: the KV latent plus the shared RoPE key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    def is_moe_layer(self, layer_id: int) -> bool:
        return (
            self.n_routed_experts > 0
            and layer_id >= self.first_k_dense_replace
            and layer_id % self.moe_layer_freq == 0
        )

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Latent-cache bytes per token over all layers (70,272 for DeepSeek-V3 in BF16)."""
        return self.num_hidden_layers * self.latent_dim * bytes_per_value

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("type", self.rope_scaling.get("rope_type", "default"))

    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times YaRN's mscale(factor, mscale_all_dim)^2 when YaRN is on."""
        scale = self.qk_head_dim ** -0.5
        if self.rope_type == "yarn":
            mscale_all_dim = self.rope_scaling.get("mscale_all_dim") or 0
            if mscale_all_dim:
                m = yarn_mscale(self.rope_scaling["factor"], mscale_all_dim)
                scale *= m * m
        return scale

    # ---- construction ---------------------------------------------------------------
    def replace(self, **changes: Any) -> "ModelConfig":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"ModelConfig has no field {unknown[0]!r}; fields are named as in an HF config.json")
        if "num_attention_heads" in changes and "num_key_value_heads" not in changes:
            changes["num_key_value_heads"] = None  # MLA: re-derived from the new head count
        return dataclasses.replace(self, **changes)

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        try:
            values = PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
        return cls(**values)

    @classmethod
    def from_hf(cls, source: str | Path | dict) -> "ModelConfig":
        """Build from an HF config.json: a dict, a file path, or the directory holding it."""
        raw = dict(source) if isinstance(source, dict) else read_config_json(source)[0]
        return cls(**_normalize_hf(raw))

    def to_hf_dict(self) -> dict:
        out: dict[str, Any] = {
            "architectures": ["DeepseekV3ForCausalLM"],
            "model_type": "deepseek_v3",
        }
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name == "quantization_config" and value is None:
                continue
            out[f.name] = value
        out["num_key_value_heads"] = self.num_attention_heads
        out.update(self.extra)
        return out


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


# ---- HF spellings ---------------------------------------------------------------------
def _normalize_hf(raw: dict) -> dict:
    """Map the transformers-5 spellings onto the DeepSeek ones and drop runtime-only keys."""
    raw = dict(raw)
    if "num_mtp_layers" in raw:
        raw.setdefault("num_nextn_predict_layers", raw.pop("num_mtp_layers"))
    params = raw.pop("rope_parameters", None)
    if params and not isinstance(params, dict):
        raise _bad("rope_parameters", params, "must be a JSON object like {\"rope_type\": \"yarn\", ...} or null")
    if params:
        params = dict(params)
        raw.setdefault("rope_theta", params.pop("rope_theta", 10000.0))
        kind = params.pop("rope_type", params.pop("type", "default"))
        if kind != "default" and "rope_scaling" not in raw:
            raw["rope_scaling"] = {"type": kind, **params}
    scaling = raw.get("rope_scaling")
    if scaling and isinstance(scaling, dict):  # anything else is refused by the validation
        scaling = dict(scaling)
        if "rope_type" in scaling:
            scaling.setdefault("type", scaling.pop("rope_type"))
        if scaling.get("type") == "default":
            scaling = None
        raw["rope_scaling"] = scaling
    if raw.get("q_lora_rank") == 0:  # DeepSeek's official V2-Lite config spells "none" as 0
        raw["q_lora_rank"] = None
    if isinstance(raw.get("eos_token_id"), list):
        raw["eos_token_id"] = raw["eos_token_id"][0] if raw["eos_token_id"] else None
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    known = {k: v for k, v in raw.items() if k in names}
    known["extra"] = {k: v for k, v in raw.items() if k not in names and k not in _IGNORED_HF_KEYS}
    return known


# ---- validation -----------------------------------------------------------------------
def _bad(name: str, value: Any, valid: str) -> ConfigError:
    return ConfigError(f"ModelConfig.{name} = {value!r} is invalid: {valid}")


_BOOL_FIELDS = ("norm_topk_prob", "seq_aux", "rope_interleave", "attention_bias", "tie_word_embeddings")


def _validate(c: ModelConfig) -> None:
    positive = (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
        "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
        "moe_layer_freq",
    )
    for name in positive:
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise _bad(name, value, "must be a positive integer")
    for name in ("intermediate_size", "moe_intermediate_size", "n_routed_experts", "n_shared_experts",
                 "first_k_dense_replace", "num_nextn_predict_layers"):
        value = getattr(c, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _bad(name, value, "must be an integer >= 0")
    if c.q_lora_rank is not None and (not isinstance(c.q_lora_rank, int) or c.q_lora_rank <= 0):
        raise _bad("q_lora_rank", c.q_lora_rank, "must be a positive integer, or null for no query compression")
    if c.num_key_value_heads is not None and c.num_key_value_heads != c.num_attention_heads:
        raise _bad("num_key_value_heads", c.num_key_value_heads,
                   f"MLA needs it equal to num_attention_heads = {c.num_attention_heads} (or null)")
    if c.qk_rope_head_dim % 2:
        raise _bad("qk_rope_head_dim", c.qk_rope_head_dim, "RoPE rotates pairs, so it must be even")
    if c.first_k_dense_replace > c.num_hidden_layers:
        raise _bad("first_k_dense_replace", c.first_k_dense_replace,
                   f"must be at most num_hidden_layers = {c.num_hidden_layers}")
    if c.first_k_dense_replace > 0 and c.intermediate_size <= 0:
        raise _bad("intermediate_size", c.intermediate_size, "dense layers need a positive intermediate_size")
    if c.scoring_func not in SCORING_FUNCS:
        raise _bad("scoring_func", c.scoring_func, f"choose one of {', '.join(SCORING_FUNCS)}")
    if c.topk_method not in TOPK_METHODS:
        raise _bad("topk_method", c.topk_method, f"choose one of {', '.join(TOPK_METHODS)}")
    if c.hidden_act != "silu":
        raise _bad("hidden_act", c.hidden_act, "DeepSeek models use 'silu' (SwiGLU)")
    if not (isinstance(c.rms_norm_eps, (int, float)) and c.rms_norm_eps > 0):
        raise _bad("rms_norm_eps", c.rms_norm_eps, "must be a positive number")
    if not (isinstance(c.routed_scaling_factor, (int, float)) and c.routed_scaling_factor > 0):
        raise _bad("routed_scaling_factor", c.routed_scaling_factor, "must be a positive number")
    if not (isinstance(c.rope_theta, (int, float)) and c.rope_theta > 0):
        raise _bad("rope_theta", c.rope_theta, "must be a positive number")
    if not isinstance(c.rope_interleave, bool):
        raise _bad("rope_interleave", c.rope_interleave,
                   "must be true (rotary dims stored in interleaved pairs, DeepSeek's layout) or false (half-split)")
    if not (isinstance(c.aux_loss_alpha, (int, float)) and math.isfinite(c.aux_loss_alpha) and c.aux_loss_alpha >= 0):
        raise _bad("aux_loss_alpha", c.aux_loss_alpha, "must be a finite number >= 0 (DeepSeek-V3: 0.0001)")
    if not (isinstance(c.initializer_range, (int, float)) and math.isfinite(c.initializer_range)
            and c.initializer_range >= 0):
        raise _bad("initializer_range", c.initializer_range, "must be a finite number >= 0 (e.g. 0.02)")
    for name in _BOOL_FIELDS:
        if not isinstance(getattr(c, name), bool):
            raise _bad(name, getattr(c, name), "must be true or false")
    if c.n_routed_experts > 0:
        _validate_routing(c)
    _validate_rope_scaling(c)


def _validate_routing(c: ModelConfig) -> None:
    if c.moe_intermediate_size <= 0:
        raise _bad("moe_intermediate_size", c.moe_intermediate_size, "MoE layers need a positive expert size")
    if not isinstance(c.n_group, int) or c.n_group < 1 or c.n_routed_experts % c.n_group:
        raise _bad("n_group", c.n_group,
                   f"must be >= 1 and divide n_routed_experts = {c.n_routed_experts} into equal groups")
    if not isinstance(c.topk_group, int) or not 1 <= c.topk_group <= c.n_group:
        raise _bad("topk_group", c.topk_group, f"must be between 1 and n_group = {c.n_group}")
    if not isinstance(c.num_experts_per_tok, int) or c.num_experts_per_tok < 1:
        raise _bad("num_experts_per_tok", c.num_experts_per_tok, "must be a positive integer")
    reachable = c.n_routed_experts if c.topk_method == "greedy" else c.topk_group * c.experts_per_group
    if c.num_experts_per_tok > reachable:
        raise _bad("num_experts_per_tok", c.num_experts_per_tok,
                   f"the {c.topk_group} allowed group(s) of {c.experts_per_group} experts hold only {reachable}; "
                   f"lower it or raise topk_group")
    if c.topk_method == "noaux_tc" and c.n_group > 1 and c.experts_per_group < 2:
        raise _bad("n_group", c.n_group, "noaux_tc scores a group by its top-2 experts, so groups need >= 2 experts")


def _validate_rope_scaling(c: ModelConfig) -> None:
    if not c.rope_scaling:
        return
    if not isinstance(c.rope_scaling, dict):
        raise _bad("rope_scaling", c.rope_scaling, "must be a dict like {'type': 'yarn', 'factor': 40, ...} or null")
    kind = c.rope_type
    if kind not in ROPE_TYPES:
        raise _bad("rope_scaling.type", kind, f"choose one of {', '.join(ROPE_TYPES)}")
    if kind == "yarn":
        factor = c.rope_scaling.get("factor")
        if not isinstance(factor, (int, float)) or factor < 1:
            raise _bad("rope_scaling.factor", factor, "YaRN needs a factor >= 1")
        orig = c.rope_scaling.get("original_max_position_embeddings")
        if not isinstance(orig, int) or orig <= 0:
            raise _bad("rope_scaling.original_max_position_embeddings", orig, "must be a positive integer")


# ---- presets --------------------------------------------------------------------------
_YARN_V3 = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
_YARN_V2 = {**_YARN_V3, "mscale": 0.707, "mscale_all_dim": 0.707}

PRESETS: dict[str, dict[str, Any]] = {
    # Trains on 2 CPU cores in minutes; keeps V3's proportions: sigmoid routing with bias, top-k within
    # the top groups (4 groups of 4, 4 experts within 2 groups), a shared expert, a dense first layer, MTP.
    "tiny": dict(
        vocab_size=4096, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=16,
        n_shared_experts=1, num_experts_per_tok=4, first_k_dense_replace=1, n_group=4, topk_group=2,
        max_position_embeddings=1024, initializer_range=0.02,
    ),
    # The GPU benchmark size: 2.7B total, about 0.45B active.
    "small": dict(
        vocab_size=32000, hidden_size=1536, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=12, num_attention_heads=16, q_lora_rank=512, kv_lora_rank=256,
        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=64,
        n_shared_experts=1, num_experts_per_tok=6, first_k_dense_replace=1, n_group=8, topk_group=4,
        max_position_embeddings=4096, initializer_range=0.02,
    ),
    "deepseek-v2-lite": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, n_group=1, topk_group=1,
        topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
        aux_loss_alpha=0.001, num_nextn_predict_layers=0, max_position_embeddings=163840,
        rope_scaling=_YARN_V2, bos_token_id=100000, eos_token_id=100001,
    ),
    "deepseek-v2": dict(
        vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
        num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=160,
        n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, n_group=8, topk_group=3,
        topk_method="group_limited_greedy", scoring_func="softmax", norm_topk_prob=False,
        routed_scaling_factor=16.0, aux_loss_alpha=0.001, num_nextn_predict_layers=0,
        max_position_embeddings=163840, rope_scaling=_YARN_V2, bos_token_id=100000, eos_token_id=100001,
    ),
    "deepseek-v3": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3, n_group=8, topk_group=4,
        topk_method="noaux_tc", scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
        num_nextn_predict_layers=1, max_position_embeddings=163840, rope_scaling=_YARN_V3,
        bos_token_id=0, eos_token_id=1,
    ),
}
