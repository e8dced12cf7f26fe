"""Loading a Hugging Face / DeepSeek checkpoint directory into a moeco Transformer.

The name table and the writer live in moeco.checkpoint (the model imports that module to save
itself); this module builds the model, so it stands above both and nothing below imports it.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from safetensors import safe_open

from moeco.config import ModelConfig, read_config_json
from moeco.errors import LoadError

log = logging.getLogger(__name__)

from moeco.checkpoint import (_DTYPES, _EXPERT_PARAM, _FP8_DTYPES, _PER_EXPERT_NAME, _ignorable,
                              _permute_rope_rows, _to_ckpt_prefix)



class _Reader:
    """Lazy access to every tensor of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, directory: Path):
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise LoadError(f"{index} is not a valid safetensors index ({exc}); re-save the checkpoint") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in directory.glob("*.safetensors"))
            if not files:
                raise LoadError(f"no *.safetensors files in {str(directory)!r}; expected model.safetensors "
                                "or a sharded model.safetensors.index.json")
        self.handles, self.where = {}, {}
        for fname in files:
            path = directory / fname
            if not path.is_file():
                raise LoadError(f"shard {fname!r} listed in the index is missing from {str(directory)!r}")
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # safetensors raises its own error types for corrupt headers
                raise LoadError(f"cannot read {str(path)!r}: {exc}") from None
            self.handles[fname] = handle
            for key in handle.keys():
                self.where[key] = fname

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def keys(self):
        return self.where.keys()

    def get(self, key: str, dtype: torch.dtype | None, used: set) -> torch.Tensor:
        """The tensor, dequantized if it is FP8 with a `_scale_inv` beside it, cast to dtype.

        dtype None: the tensor exactly as stored (FP8 weights kept, for keep_fp8 loading).
        """
        used.add(key)
        t = self.handles[self.where[key]].get_tensor(key)
        if not t.is_floating_point():
            raise LoadError(f"tensor {key!r} is stored as {t.dtype}, a floating-point tensor is expected; the "
                            f"checkpoint is damaged or not a model checkpoint")
        if dtype is None:
            return t
        if t.dtype in _FP8_DTYPES:
            scale_key = key + "_scale_inv"
            if scale_key not in self.where:
                raise LoadError(f"FP8 tensor {key!r} has no {scale_key!r} beside it; cannot dequantize")
            used.add(scale_key)
            from moeco.fp8.quantize import dequantize_weight_128x128

            scale = self.handles[self.where[scale_key]].get_tensor(scale_key)
            try:
                t = dequantize_weight_128x128(t, scale.float(), dtype=torch.float32)
            except ValueError as exc:
                raise LoadError(f"{scale_key!r}: {exc}") from None
        t = t.to(dtype)
        if not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise LoadError(f"tensor {key!r} holds {n:,} NaN or infinite value(s) of {t.numel():,}; the checkpoint "
                            f"is damaged or the run that wrote it diverged: use an earlier checkpoint")
        return t


def _check_memory(expected: dict, dtype: torch.dtype, device, directory: Path) -> None:
    """The weights are read into host memory, then moved: both must hold them (before anything is read)."""
    from moeco.resources import check_fits

    n = sum(t.numel() for t in expected.values())
    nbytes = sum(t.numel() * (dtype.itemsize if t.is_floating_point() and t.dtype not in _FP8_DTYPES
                              else t.element_size()) for t in expected.values())
    what = f"the weights of {str(directory)!r} ({n / 1e6:,.1f}M parameters in {str(dtype).removeprefix('torch.')})"
    fix = "load it on a machine with more memory, in a smaller dtype (bfloat16), or keep_fp8 for an FP8 checkpoint"
    check_fits(nbytes, "cpu", what, fix)
    if torch.device(device).type == "cuda":
        check_fits(nbytes, device, what, fix)


def _gather_experts(reader: _Reader, prefix: str, which: str, n_experts: int, dtype, used: set,
                    suffix: str = "", first: int = 0) -> torch.Tensor:
    """One 3-D expert tensor from the fused (transformers 5) or the per-expert (DeepSeek) layout:
    experts [first, first + n_experts) of the layer (an expert-parallel rank's range)."""
    fused_key = f"{prefix}.down_proj" if which == "w2_EDF" else f"{prefix}.gate_up_proj"
    if fused_key in reader and not suffix and dtype is not None:
        t = reader.get(fused_key, dtype, used)[first:first + n_experts]
        if which in ("w2_EDF", "w13_E2FD"):
            return t
        half = t.shape[1] // 2
        return t[:, :half] if which == "w1_EFD" else t[:, half:]
    parts = _PER_EXPERT_NAME[which]
    keys = [[f"{prefix}.{j}.{part}.weight{suffix}" for part in parts] for j in range(first, first + n_experts)]
    missing = [k for row in keys for k in row if k not in reader]
    if missing:
        raise LoadError(f"missing tensor {missing[0]!r} (and {len(missing) - 1} more expert tensors)"
                        if len(missing) > 1 else f"missing tensor {missing[0]!r}")
    return torch.stack([torch.cat([reader.get(k, dtype, used) for k in row]) for row in keys])


def load_pretrained(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                    recipe=None, keep_fp8: bool = False, ep_rank: int = 0, ep_size: int = 1):
    """Load a DeepSeek-V3-family checkpoint directory into a moeco Transformer.

    dtype: the parameters' dtype (default: config.json's torch_dtype, float32 if absent; FP8 weights
    are dequantized to it). The router stays float32. A checkpoint without any MTP tensors loads
    with the MTP modules switched off (transformers writes none); a partial MTP layer is an error.
    keep_fp8: for FP8 checkpoints (DeepSeek's release), keep the projection and expert weights in
    FP8 with their block scales (moeco.fp8.inference): half the memory of BF16, FP8 GEMMs on CUDA.
    ep_rank, ep_size: read only the routed experts expert-parallel rank `ep_rank` of `ep_size` holds
    (experts [ep_rank E/ep_size, (ep_rank+1) E/ep_size) of each layer); the rest is read whole.
    """
    from moeco.model.transformer import Transformer

    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise LoadError(f"{str(directory)!r} has no config.json; pass the checkpoint directory")
    raw, _ = read_config_json(directory)
    config = ModelConfig.from_hf(raw)
    if dtype is None:
        dtype = _DTYPES.get(raw.get("torch_dtype") or raw.get("dtype"), torch.float32)
    reader = _Reader(directory)
    L = config.num_hidden_layers
    if config.num_nextn_predict_layers and not any(k.startswith(f"model.layers.{L}.") for k in reader.keys()):
        log.warning("checkpoint has no MTP layer (model.layers.%d.*); loading with num_nextn_predict_layers=0", L)
        config = config.replace(num_nextn_predict_layers=0)

    if keep_fp8:
        if not any(k.endswith("_scale_inv") for k in reader.keys()):
            raise LoadError(f"keep_fp8: {str(directory)!r} has no FP8 weights (no *_scale_inv tensors); "
                            "load it without keep_fp8")
        from moeco.fp8.inference import Fp8InferenceRecipe

        recipe = Fp8InferenceRecipe()
    with torch.device("meta"):
        model = Transformer(config, recipe=recipe)
    first = 0
    if ep_size != 1:
        from moeco.parallel.expert_parallel import shard_experts
        from moeco.parallel.mesh import MeshSpec

        if not 0 <= ep_rank < ep_size:
            raise LoadError(f"ep_rank = {ep_rank} must lie in [0, ep_size = {ep_size})")
        shard_experts(model, MeshSpec(ep_size, ep_rank, ep_size, ep_size).validated())
        first = ep_rank * (config.n_routed_experts // ep_size)
    expected = model.state_dict()
    _check_memory(expected, dtype, device, directory)
    state, used = {}, set()
    for name, meta in expected.items():
        ckpt_name = _to_ckpt_prefix(name, L)
        want_dtype = torch.float32 if meta.dtype == torch.float32 and ".mlp.gate." in name else dtype
        if meta.dtype in _FP8_DTYPES or name.endswith("_scale_inv"):
            want_dtype = None  # kept exactly as shipped (keep_fp8)
        m = _EXPERT_PARAM.match(ckpt_name)
        if m:
            t = _gather_experts(reader, m.group(1), m.group(2), meta.shape[0], want_dtype, used,
                                suffix="_scale_inv" if m.group(3) else "", first=first)
        elif ckpt_name in reader:
            t = reader.get(ckpt_name, want_dtype, used)
        elif name == "lm_head.weight" and config.tie_word_embeddings:
            t = state.get("model.embed_tokens.weight")
        else:
            raise LoadError(f"missing tensor {ckpt_name!r} (shape {tuple(meta.shape)}) in {str(directory)!r}")
        if want_dtype is None and t.dtype != meta.dtype:
            raise LoadError(f"tensor {ckpt_name!r} is {t.dtype}, keep_fp8 expects {meta.dtype} as in "
                            "DeepSeek's FP8 release")
        if tuple(t.shape) != tuple(meta.shape):
            raise LoadError(f"tensor {ckpt_name!r} has shape {tuple(t.shape)}, the config expects "
                            f"{tuple(meta.shape)}; the checkpoint and config.json disagree")
        state[name] = _permute_rope_rows(config, ckpt_name, t, to_interleaved=True)
    unexpected = sorted(k for k in reader.keys()
                        if k not in used and not _ignorable(k, L) and not _is_dropped_mtp(k, L, config)
                        and not (ep_size != 1 and _other_ranks_expert(k)))
    if unexpected:
        raise LoadError(f"unexpected tensor {unexpected[0]!r} in {str(directory)!r}"
                        + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
                        + "; the checkpoint does not match its config.json")
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.reset_buffers(torch.device("cpu"))  # non-persistent buffers are still on the meta device
    model.to(device)
    return model.eval()


def _other_ranks_expert(key: str) -> bool:
    """A routed expert's tensor (another expert-parallel rank reads it)."""
    return bool(re.search(r"\.mlp\.experts\.(\d+\.|gate_up_proj|down_proj)", key))


def _is_dropped_mtp(key: str, num_layers: int, config: ModelConfig) -> bool:
    m = re.match(r"^model\.layers\.(\d+)\.", key)
    return bool(m and int(m.group(1)) >= num_layers + config.num_nextn_predict_layers)


# ---- writing -------------------------------------------------------------------------------


def load_tokenizer(model_dir: str | Path):
    """The checkpoint directory's tokenizer.json as a `tokenizers.Tokenizer`; None when it has none."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise LoadError(f"{str(path)!r} cannot be read as a tokenizer ({str(exc).splitlines()[0]}); replace it "
                        "with the tokenizer.json the model was trained with") from None
