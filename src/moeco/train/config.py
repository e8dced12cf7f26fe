"""TrainConfig: every training option, read from TOML and overridable from the command line.

A config file has five tables and a `[model]` table that takes a preset plus any `ModelConfig`
field (named as in an HF config.json):

    [model]   preset = "tiny", hidden_size = 256, aux_loss_alpha = 0.0001, ...
    [data]    path, tokenizer, seq_len, val_fraction
    [train]   steps, batch_size, micro_batch_size, seed, lr, warmup_steps, ..., precision, compile, cuda_graph
    [parallel] dispatch_codec, combine_codec   (wire formats of the MoE's two crossings, moeco.comm)
    [checkpoint] every, keep
    [log]     interval, eval_interval, eval_batches, peak_tflops

`--set KEY=VALUE` changes one key: `train.lr=3e-4`, `model.hidden_size=256`, or the bare name when
it is unambiguous (`lr=3e-4`). VALUE is read as a TOML value (`true`, `1e-3`, `"text"`); a value
that is not valid TOML is taken as a string. `moeco train --print-config` prints the whole file
with a comment per option.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moeco.config import ModelConfig
from moeco.errors import ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

PRECISIONS = ("auto", "fp32", "bf16", "fp8", "fp8-ue8m0")


def _opt(default: Any, section: str, doc: str) -> Any:
    return field(default=default, metadata={"section": section, "doc": doc})


@dataclass(frozen=True)
class TrainConfig:
    # [data]
    data_path: str = _opt("", "data", "text file, folder of .txt/.md/.jsonl files, or JSONL with a 'text' field; "
                                      "empty = the embedded corpus (Python's own documentation)")
    tokenizer: str = _opt("", "data", "HF tokenizer directory or tokenizer.json to use as-is; empty = train a "
                                      "byte-level BPE of the model's vocab_size on the training text")
    seq_len: int = _opt(256, "data", "tokens per training sequence (packed, documents joined by EOS)")
    val_fraction: float = _opt(0.02, "data", "share of the packed sequences held out for validation")
    # [train]
    steps: int = _opt(1000, "train", "optimizer steps")
    batch_size: int = _opt(16, "train", "global batch in sequences per optimizer step (all ranks, all micro-steps)")
    micro_batch_size: int = _opt(0, "train", "sequences per rank per forward; 0 = batch_size / ranks "
                                             "(no gradient accumulation)")
    seed: int = _opt(0, "train", "seed for the initial weights and the data order")
    lr: float = _opt(1e-3, "train", "peak learning rate (AdamW)")
    min_lr_ratio: float = _opt(0.1, "train", "the cosine decays to lr * min_lr_ratio at the last step")
    warmup_steps: int = _opt(100, "train", "linear warmup from 0 to lr")
    weight_decay: float = _opt(0.1, "train", "AdamW decoupled weight decay on matrices (DeepSeek-V3: 0.1)")
    beta1: float = _opt(0.9, "train", "AdamW beta1 (DeepSeek-V3: 0.9)")
    beta2: float = _opt(0.95, "train", "AdamW beta2 (DeepSeek-V3: 0.95)")
    grad_clip: float = _opt(1.0, "train", "clip the global gradient norm to this; 0 = off")
    mtp_lambda: float = _opt(0.3, "train", "weight of the multi-token-prediction loss (DeepSeek-V3: 0.3, "
                                           "later 0.1); depth is model.num_nextn_predict_layers")
    bias_update_speed: float | str = _opt("auto", "train", "gamma of auxiliary-loss-free balancing: the routing "
                                                         "bias moves by this per step; 0 = off; auto = "
                                                         "clamp(3 / steps, 0.001, 0.01). The sequence-wise "
                                                         "balance loss weight is model.aux_loss_alpha")
    max_nonfinite_steps: int = _opt(1, "train", "stop the run after this many steps in a row whose loss or gradient "
                                                "norm is NaN or infinite (no checkpoint or model is written from "
                                                "such weights)")
    precision: str = _opt("auto", "train", "auto (bf16 autocast on a GPU that has it, else fp32) | fp32 | bf16 "
                                           "| fp8 (needs moeco.fp8)")
    optimizer_moments: str = _opt("auto", "train", "AdamW moment dtype: auto (bf16 with fp8 precision, as "
                                                   "DeepSeek-V3; else fp32) | fp32 | bf16")
    fp8_weight_cache: bool = _opt(True, "train", "with fp8 and gradient accumulation, quantize each weight "
                                                 "once per optimizer step, not once per micro-step (holds W "
                                                 "and W^T in FP8, 2 bytes per parameter, through the step; "
                                                 "eager layers only)")
    compile: bool = _opt(False, "train", "torch.compile each decoder block (regional; ~30 s on a GPU)")
    cuda_graph: bool = _opt(False, "train", "replay each optimizer step as one CUDA graph after 2 eager steps "
                                            "(removes per-kernel launch cost; one CUDA process)")
    device: str = _opt("auto", "train", "auto | cpu | cuda (torchrun: cuda:LOCAL_RANK)")
    # [parallel]
    dispatch_codec: str = _opt("none", "parallel", "wire format of the MoE dispatch input: none | bf16 | e4m3 | e5m2 "
                                                   "| logfmt8 | logfmt10 | logfmtN (moeco.comm; applied in one "
                                                   "process as decode(encode(x)), straight-through gradient)")
    combine_codec: str = _opt("none", "parallel", "wire format of the expert outputs before the weighted sum "
                                                  "(combine): same choices as dispatch_codec")
    # [checkpoint]
    checkpoint_every: int = _opt(200, "checkpoint", "write a checkpoint every N steps (and at the end); 0 = end only")
    keep_checkpoints: int = _opt(2, "checkpoint", "how many recent checkpoints to keep; 0 = none (only the final "
                                                "model/ is written: the run cannot be resumed)")
    # [log]
    log_interval: int = _opt(10, "log", "print one line every N steps (metrics.jsonl gets every step)")
    eval_interval: int = _opt(100, "log", "validation loss every N steps (and at the end); 0 = end only")
    eval_batches: int = _opt(8, "log", "validation batches of batch_size sequences per evaluation")
    peak_tflops: float = _opt(0.0, "log", "peak TFLOP/s of one device for MFU; 0 = known GPUs only")
    # [parallel] expert parallelism (moeco.parallel; torchrun sets the ranks)
    ep: int = _opt(1, "parallel", "expert-parallel ranks: each holds n_routed_experts / ep routed experts, the "
                                  "rest stays data-parallel over all ranks; 1 = off")
    gpus_per_node: int = _opt(0, "parallel", "ranks per node of the mesh; 0 = torchrun's --nproc-per-node "
                                             "(a smaller value lets one host stand in for several nodes)")
    dispatcher: str = _opt("two_hop", "parallel", "two_hop (each token crosses to a node once, forwarded "
                                                  "inside it) | direct (one all-to-all copy per expert)")
    fp8_dispatch: bool = _opt(False, "parallel", "send dispatched tokens as 1x128 E4M3 + scales (half of BF16)")
    timeout_s: float = _opt(600.0, "parallel", "seconds a collective may wait before the run stops with an error")
    overlap: str = _opt("none", "parallel", "none | two_microbatch (each batch split in two: one half's all-to-all "
                                            "in flight while the other computes; moeco.parallel.overlap)")
    # [model]
    preset: str = _opt("tiny", "model", "a ModelConfig preset; any ModelConfig field may follow in [model]")
    model_overrides: dict = field(default_factory=dict, metadata={"section": "model", "doc": ""})

    def __post_init__(self) -> None:
        _validate(self)

    def balance_gamma(self) -> float:
        """`bias_update_speed` with "auto" resolved for this run's length (moeco.train.balance.auto_gamma)."""
        if self.bias_update_speed == "auto":
            from moeco.train.balance import auto_gamma

            return auto_gamma(self.steps)
        return float(self.bias_update_speed)

    def moment_dtype(self) -> str:
        """AdamW's moment dtype, "fp32" or "bf16": `optimizer_moments` with "auto" resolved (bf16 for FP8)."""
        if self.optimizer_moments == "auto":
            return "bf16" if self.precision.startswith("fp8") else "fp32"
        return self.optimizer_moments

    # ---- the model ---------------------------------------------------------------------
    def model_config(self) -> ModelConfig:
        overrides = dict(self.model_overrides)
        if "num_attention_heads" in overrides:  # MLA: the KV head count follows the head count
            overrides.setdefault("num_key_value_heads", None)
        return ModelConfig.preset(self.preset).replace(**overrides)

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path: str | Path) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass a TOML file "
                              f"(`moeco train --print-config > train.toml` writes one)")
        if tomllib is None:
            raise ConfigError("reading TOML needs Python 3.11 or newer; pass options with --set instead")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{str(path)!r} is not valid TOML ({exc})") from None
        return cls().merge_tables(raw, source=str(path))

    def merge_tables(self, raw: dict, source: str = "config") -> "TrainConfig":
        """Apply a TOML document (tables of keys) on top of this config."""
        changes: dict[str, Any] = {}
        model = dict(self.model_overrides)
        for table, values in raw.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: top-level key {table!r} must be inside a table "
                                  f"([data], [train], [parallel], [checkpoint], [log] or [model])")
            for key, value in values.items():
                name, is_model_field = _resolve(f"{table}.{key}")
                if is_model_field:
                    model[name] = _model_value(value)
                else:
                    changes[name] = value
        return self.replace(**changes, model_overrides=model)

    def with_overrides(self, assignments: list[str]) -> "TrainConfig":
        """Apply `--set KEY=VALUE` strings."""
        changes: dict[str, Any] = {}
        model = dict(self.model_overrides)
        for item in assignments:
            key, sep, text = item.partition("=")
            if not sep or not key.strip():
                raise ConfigError(f"--set {item!r} is not KEY=VALUE; e.g. --set train.lr=3e-4")
            name, is_model_field = _resolve(key.strip())
            value = _strict_bool(key.strip(), name, is_model_field, parse_value(text.strip()))
            if is_model_field:
                model[name] = _model_value(value)
            else:
                changes[name] = value
        return self.replace(**changes, model_overrides=model)

    def replace(self, **changes: Any) -> "TrainConfig":
        for name, value in list(changes.items()):
            changes[name] = _coerce(name, value)
        return dataclasses.replace(self, **changes)

    # ---- output ------------------------------------------------------------------------
    def to_tables(self) -> dict[str, dict[str, Any]]:
        tables: dict[str, dict[str, Any]] = {s: {} for s in ("model", "data", "train", "parallel", "checkpoint",
                                                                "log")}
        for f in dataclasses.fields(self):
            if f.name == "model_overrides":
                continue
            tables[f.metadata["section"]][_TOML_NAME.get(f.name, f.name)] = getattr(self, f.name)
        tables["model"].update(self.model_overrides)
        return tables

    def to_toml(self, comments: bool = True) -> str:
        docs = {(f.metadata["section"], _TOML_NAME.get(f.name, f.name)): f.metadata["doc"]
                for f in dataclasses.fields(self)}
        lines: list[str] = []
        for section, values in self.to_tables().items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                doc = docs.get((section, key))
                if comments and doc:
                    lines.append(f"# {doc}")
                lines.append(f"{key} = {_toml_value(value)}")
            if section == "model" and comments:
                lines.append("# any ModelConfig field may be set here, e.g. hidden_size = 256")
            lines.append("")
        return "\n".join(lines)


# TOML key -> field name where they differ (the TOML keys read better inside their table).
_TOML_NAME = {"data_path": "path", "checkpoint_every": "every", "keep_checkpoints": "keep",
              "log_interval": "interval"}
_FIELD_OF = {(f.metadata["section"], _TOML_NAME.get(f.name, f.name)): f.name
             for f in dataclasses.fields(TrainConfig) if f.name != "model_overrides"}
_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"extra"}


def _resolve(key: str) -> tuple[str, bool]:
    """'train.lr' | 'lr' | 'model.hidden_size' | 'hidden_size' -> (field name, is a ModelConfig field)."""
    if "." in key:
        section, _, name = key.partition(".")
        if (section, name) in _FIELD_OF:
            return _FIELD_OF[(section, name)], False
        if section == "model" and name in _MODEL_FIELDS:
            return name, True
        raise ConfigError(f"unknown option {key!r}; `moeco train --print-config` lists them all "
                          f"([model] also takes any ModelConfig field)")
    matches = [field_name for (section, name), field_name in _FIELD_OF.items() if name == key]
    if key in {f.name for f in dataclasses.fields(TrainConfig)} - {"model_overrides"}:
        matches = [key]
    if len(matches) == 1:
        return matches[0], False
    if key in _MODEL_FIELDS:
        return key, True
    raise ConfigError(f"unknown option {key!r}; write SECTION.KEY (e.g. train.lr, model.hidden_size); "
                      f"`moeco train --print-config` lists them all")


def parse_value(text: str) -> Any:
    """A TOML value (`3e-4`, `true`, `"x"`, `[1, 2]`, `{type = "yarn"}`), else the raw string."""
    if tomllib is not None:
        try:
            return tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            pass
    return text


_BOOL_WORDS = {"true": True, "false": False}


def _strict_bool(key: str, name: str, is_model_field: bool, value: Any) -> Any:
    """A boolean option given as text: "true"/"false" in any case, else a one-line error.

    TOML spells booleans in lower case only, so `--set model.norm_topk_prob=False` arrives as the
    string "False", which Python would count as true.
    """
    fields = dataclasses.fields(ModelConfig) if is_model_field else dataclasses.fields(TrainConfig)
    f = next((f for f in fields if f.name == name), None)
    if f is None or not isinstance(f.default, bool) or not isinstance(value, str):
        return value
    if value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise ConfigError(f"{key} = {value!r} is invalid: expected true or false")


def _model_value(value: Any) -> Any:
    # TOML has no null: "none" stands for None in [model] (e.g. q_lora_rank = "none").
    return None if isinstance(value, str) and value.lower() in ("none", "null") else value


def _coerce(name: str, value: Any) -> Any:
    f = next((f for f in dataclasses.fields(TrainConfig) if f.name == name), None)
    if f is None:
        raise ConfigError(f"TrainConfig has no option {name!r}")
    if name == "model_overrides":
        return dict(value)
    want = type(f.default)
    if name == "bias_update_speed":  # a number, or "auto"
        if value == "auto":
            return value
        want = float
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is bool and not isinstance(value, bool) or want is not bool and isinstance(value, bool) \
            or not isinstance(value, want):
        section = f.metadata["section"]
        raise ConfigError(f"{section}.{_TOML_NAME.get(name, name)} = {value!r} is invalid: "
                          f"expected {want.__name__}")
    return value


def _bad(name: str, value: Any, valid: str) -> ConfigError:
    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return ConfigError(f"{f.metadata['section']}.{_TOML_NAME.get(name, name)} = {value!r} is invalid: {valid}")


def _validate(c: TrainConfig) -> None:
    for name in ("steps", "batch_size", "seq_len"):
        if getattr(c, name) < 1:
            raise _bad(name, getattr(c, name), "must be at least 1")
    for name in ("micro_batch_size", "warmup_steps", "checkpoint_every", "eval_interval", "weight_decay",
                 "grad_clip", "mtp_lambda", "peak_tflops", "seed"):
        if getattr(c, name) < 0:
            raise _bad(name, getattr(c, name), "must be >= 0")
    if c.bias_update_speed != "auto" and not (c.bias_update_speed >= 0 and math.isfinite(c.bias_update_speed)):
        raise _bad("bias_update_speed", c.bias_update_speed, 'must be a number >= 0, or "auto"')
    if c.keep_checkpoints < 0:
        raise _bad("keep_checkpoints", c.keep_checkpoints, "must be >= 0 (0 = write no checkpoints)")
    for name in ("log_interval", "eval_batches", "max_nonfinite_steps"):
        if getattr(c, name) < 1:
            raise _bad(name, getattr(c, name), "must be at least 1")
    if not (c.lr > 0 and math.isfinite(c.lr)):
        raise _bad("lr", c.lr, "must be a positive number")
    if not 0 <= c.min_lr_ratio <= 1:
        raise _bad("min_lr_ratio", c.min_lr_ratio, "must be between 0 and 1")
    if not 0 < c.val_fraction < 1:
        raise _bad("val_fraction", c.val_fraction, "must be between 0 and 1 (exclusive)")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(c, name) < 1:
            raise _bad(name, getattr(c, name), "must be in [0, 1)")
    if c.precision not in PRECISIONS:
        raise _bad("precision", c.precision, f"choose one of {', '.join(PRECISIONS)}")
    if c.optimizer_moments not in ("auto", "fp32", "bf16"):
        raise _bad("optimizer_moments", c.optimizer_moments, "choose auto, fp32 or bf16")
    if c.device not in ("auto", "cpu", "cuda") and not c.device.startswith("cuda:"):
        raise _bad("device", c.device, "choose auto, cpu, cuda or cuda:N")
    _validate_parallel(c)


def _validate_parallel(c: TrainConfig) -> None:
    from moeco.comm.names import parse_codec_name

    for name in ("dispatch_codec", "combine_codec"):
        parse_codec_name(getattr(c, name), f"parallel.{name}")  # raises a one-line ConfigError
    if c.ep < 1:
        raise _bad("ep", c.ep, "must be at least 1")
    if c.gpus_per_node < 0:
        raise _bad("gpus_per_node", c.gpus_per_node, "must be >= 0 (0 = torchrun's --nproc-per-node)")
    if c.dispatcher not in ("two_hop", "direct"):
        raise _bad("dispatcher", c.dispatcher, "choose two_hop or direct")
    if c.overlap not in ("none", "two_microbatch"):
        raise _bad("overlap", c.overlap, "choose none or two_microbatch")
    if not c.timeout_s > 0:
        raise _bad("timeout_s", c.timeout_s, "must be a positive number of seconds")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if value is None:
        return '"none"'  # TOML has no null; callers never write None for a training option
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")
