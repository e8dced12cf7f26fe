"""Hugging Face / DeepSeek checkpoints in and out: config.json + safetensors (single file or sharded).

The one name table. moeco's module names are the HF names, except:

    moeco state dict                          checkpoint
    model.layers.{i}.mlp.experts.w13_E2FD <-  model.layers.{i}.mlp.experts.{j}.gate_proj.weight  (F, D) x E
                                              then ....{j}.up_proj.weight, (F, D) x E, along the rows
    model.layers.{i}.mlp.experts.w2_EDF   <-  model.layers.{i}.mlp.experts.{j}.down_proj.weight  (D, F) x E
                                          or  transformers-5 fused: experts.gate_up_proj (E, 2F, D), experts.down_proj (E, D, F)
    (FP8 inference experts keep w1_EFD / w3_EFD apart, each with its own 128x128 `_scale_inv` blocks)
    mtp.{k}.<name>                        <-> model.layers.{L+k}.<name>        (L = num_hidden_layers)
    (shared)                              <-> model.layers.{L+k}.embed_tokens.weight, .shared_head.head.weight
                                              (copies of the main embedding and head: written, ignored on load)

DeepSeek's official FP8 release stores `W` as float8_e4m3fn plus `W_scale_inv` (float32, one per
128x128 block, edge blocks partial): W = W_fp8 * scale per block. They are dequantized to the
requested dtype on load. Saving writes the per-expert DeepSeek layout, atomically: every file goes
to a temporary directory next to the target, is fsynced, and the directory is renamed into place.
Loading checks every tensor's presence and shape before anything is assigned: nothing half-loads.

Rotary row layout. moeco rotates interleaved pairs (x0, x1), (x2, x3), ... of the R rotary dims, as
DeepSeek's checkpoints store them (`rope_interleave: true`, the default). A checkpoint with
`rope_interleave: false` stores them half-split, pair j = (x_j, x_{j+R/2}) (transformers then
applies rotate_half). Only the rows that produce rotary dims differ: per head the last R rows of
q_b_proj / q_proj, and the last R rows of kv_a_proj_with_mqa (and its bias). `rope_rows_permutation`
reorders them to moeco's layout on load and back on save; FP8 rows move within their 128-row
scale block only (the scales stay as they are), and a permutation that would cross blocks is refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeco.config import ModelConfig, read_config_json
from moeco.errors import LoadError
from moeco.fsutil import fsync_tree, publish_dir

log = logging.getLogger(__name__)

_EXPERT_PARAM = re.compile(r"^(.*\.mlp\.experts)\.(w13_E2FD|w1_EFD|w3_EFD|w2_EDF)(_scale_inv)?$")
# moeco's 3-D expert tensor -> the per-expert checkpoint matrices it stacks (w13: gate rows, then up rows)
_PER_EXPERT_NAME = {"w13_E2FD": ("gate_proj", "up_proj"), "w1_EFD": ("gate_proj",), "w3_EFD": ("up_proj",),
                    "w2_EDF": ("down_proj",)}
_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_SHARD_BYTES = 5 * 1024**3


# ---- names ---------------------------------------------------------------------------------
def _to_ckpt_prefix(name: str, num_layers: int) -> str:
    if name.startswith("mtp."):
        k, rest = name[4:].split(".", 1)
        return f"model.layers.{num_layers + int(k)}.{rest}"
    return name


def _ignorable(name: str, num_layers: int) -> bool:
    """Checkpoint tensors moeco reads nowhere on purpose."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    m = re.match(r"^model\.layers\.(\d+)\.(embed_tokens\.weight|shared_head\.head\.weight)$", name)
    return bool(m and int(m.group(1)) >= num_layers)


# ---- rotary row layout ---------------------------------------------------------------------
_ROPE_ROWS = re.compile(r"\.self_attn\.(q_proj|q_b_proj|kv_a_proj_with_mqa)\.(weight|bias)$")


def rope_rows_permutation(config: ModelConfig, ckpt_name: str, n_rows: int, to_interleaved: bool = True
                          ) -> torch.Tensor | None:
    """Row order taking a half-split checkpoint tensor to moeco's interleaved layout (or back, with
    to_interleaved=False): `moeco = ckpt[perm]`. None for tensors without rotary rows, or when the
    checkpoint is interleaved already (config.rope_interleave)."""
    m = _ROPE_ROWS.search(ckpt_name)
    if config.rope_interleave or m is None:
        return None
    R, half = config.qk_rope_head_dim, config.qk_rope_head_dim // 2
    # interleaved slot 2j holds half-split dim j, slot 2j+1 holds dim j + R/2
    from_half = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()
    within = from_half if to_interleaved else from_half.argsort()
    if m.group(1) == "kv_a_proj_with_mqa":
        starts = [config.kv_lora_rank]
    else:
        qk = config.qk_head_dim
        starts = [h * qk + config.qk_nope_head_dim for h in range(config.num_attention_heads)]
    perm = torch.arange(n_rows)
    for start in starts:
        perm[start:start + R] = start + within
    return perm


def _permute_rope_rows(config: ModelConfig, ckpt_name: str, t: torch.Tensor, to_interleaved: bool) -> torch.Tensor:
    perm = rope_rows_permutation(config, ckpt_name, t.shape[0], to_interleaved)
    if perm is None:
        return t
    if t.dtype in _FP8_DTYPES:  # the 128x128 block scales stay valid only if no row leaves its block
        crossing = (perm // 128 != torch.arange(len(perm)) // 128).nonzero()
        if len(crossing):
            r = int(crossing[0])
            raise LoadError(f"rope_interleave=false: reordering the rotary rows of FP8 tensor {ckpt_name!r} "
                            f"moves row {int(perm[r])} into the 128-row scale block of row {r}; "
                            "load it without keep_fp8 (dequantized) or save it in high precision")
        return t.view(torch.uint8)[perm].view(t.dtype)
    return t[perm]


# ---- reading -------------------------------------------------------------------------------
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
def checkpoint_state_dict(model, fp8: bool = False) -> dict[str, torch.Tensor]:
    """The model's tensors under checkpoint names, per-expert, contiguous; FP8 + scale_inv if asked."""
    config: ModelConfig = model.config
    L = config.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        ckpt_name = _to_ckpt_prefix(name, L)
        m = _EXPERT_PARAM.match(ckpt_name)
        if m:
            parts = _PER_EXPERT_NAME[m.group(2)]
            for j in range(t.shape[0]):
                for part, w in zip(parts, t[j].detach().chunk(len(parts))):
                    out[f"{m.group(1)}.{j}.{part}.weight{m.group(3) or ''}"] = w.clone().contiguous()
        else:
            t = _permute_rope_rows(config, ckpt_name, t.detach(), to_interleaved=False)
            out[ckpt_name] = t.clone().contiguous()
    for k in range(config.num_nextn_predict_layers):  # DeepSeek's layout repeats these in the MTP layer
        out[f"model.layers.{L + k}.embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
        head = model.lm_head.weight
        out[f"model.layers.{L + k}.shared_head.head.weight"] = head.detach().clone().contiguous()
    if fp8:
        from moeco.fp8.quantize import quantize_weight_128x128

        for name in [n for n in out if _fp8_eligible(n, out[n])]:
            q, scale = quantize_weight_128x128(out[name].float())
            out[name], out[name + "_scale_inv"] = q, scale.float()
    return out


_FP8_MODULES = {"q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                "gate_proj", "up_proj", "down_proj"}


def _fp8_eligible(name: str, t: torch.Tensor) -> bool:
    """The matrices DeepSeek ships in FP8: attention and FFN projections (not embeddings, head, router,
    norms or the MTP's eh_proj). Weights already in FP8 (keep_fp8) are written as they are."""
    parts = name.split(".")
    return (t.dim() == 2 and parts[-1] == "weight" and parts[-2] in _FP8_MODULES
            and t.dtype not in _FP8_DTYPES)


def save_pretrained(model, path: str | Path, *, max_shard_bytes: int = DEFAULT_SHARD_BYTES, fp8: bool = False,
                    extra_files: dict[str, str | Path | bytes] | None = None) -> Path:
    """Write config.json + safetensors (sharded above max_shard_bytes) to `path`, atomically.

    extra_files: name -> source path or bytes, written into the same directory (e.g. tokenizer.json).
    An existing `path` is updated only if it is a checkpoint directory (has config.json) or empty, and
    only the files moeco writes are replaced: its other files (a tokenizer, README.md,
    generation_config.json) are linked into the new directory, which then replaces the old one with
    one rename. Weights are written 0644, as the other files are.
    """
    target = Path(path)
    if target.exists() and not (target.is_dir() and ((target / "config.json").exists() or not any(target.iterdir()))):
        raise LoadError(f"refusing to overwrite {str(target)!r}: it exists and is not a checkpoint directory; "
                        "choose another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensors = checkpoint_state_dict(model, fp8=fp8)
        shards, current, size = [], {}, 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name], size = t, size + nbytes
        shards.append(current)
        if len(shards) == 1:
            _save_file(shards[0], tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, shard in enumerate(shards, start=1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                _save_file(shard, tmp / fname)
                weight_map.update({name: fname for name in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        hf = model.config.to_hf_dict()
        dtype = model.model.embed_tokens.weight.dtype
        hf["torch_dtype"] = str(dtype).removeprefix("torch.")
        if fp8:
            hf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}
        (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
        for name, src in (extra_files or {}).items():
            dst = tmp / name
            if isinstance(src, bytes):
                dst.write_bytes(src)
            else:
                shutil.copyfile(src, dst)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~_umask())
        if target.is_dir():
            _keep_other_files(target, tmp, written={p.name for p in tmp.iterdir()})
        fsync_tree(tmp)
        publish_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _save_file(tensors: dict, path: Path) -> None:
    """safetensors' save_file, its I/O failures raised as OSError (a full disk is then ENOSPC, with the path)."""
    from safetensors import SafetensorError

    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None


_MOECO_FILES = re.compile(r"^(config\.json|model\.safetensors|model\.safetensors\.index\.json"
                          r"|model-\d{5}-of-\d{5}\.safetensors)$")


def _keep_other_files(target: Path, tmp: Path, written: set[str]) -> None:
    """Hard-link (or copy) what `target` holds besides moeco's own files into `tmp`."""
    for src in target.iterdir():
        if src.name in written or _MOECO_FILES.match(src.name):
            continue
        dst = tmp / src.name
        if src.is_dir() and not src.is_symlink():
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        elif src.is_symlink():
            dst.symlink_to(src.readlink())
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
