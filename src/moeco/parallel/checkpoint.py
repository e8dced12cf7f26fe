"""Sharded checkpoints under expert parallelism, in the Hugging Face layout a single process reads.

A directory written by `save_sharded` (P = EP size, every rank of the first EP group takes part):

    config.json, model.safetensors.index.json          written by rank 0
    model-00001-of-{P+1}.safetensors                  everything but the routed experts (rank 0)
    model-{e+2}-of-{P+1}.safetensors                  EP rank e's experts, per expert under the layer's
                                                      ids (model.layers.i.mlp.experts.j.gate_proj.weight)

so `moeco.load_pretrained(dir)` and transformers load it whole in one process, and
`load_pretrained(dir, ep_rank=e, ep_size=P')` reads only rank e's experts under any P' dividing E
(resuming under a different EP size re-shards on load). No rank ever holds another rank's experts.

Optimizer state: AdamW's per-parameter tensors of an expert parameter are sharded like it; for the
trainer's `trainer.pt` they are gathered along the expert dim to rank 0 (`gather_optimizer_state`)
and sliced back to each rank's range on load (`shard_optimizer_state`), so the file does not depend
on the EP size. (It holds the full expert moments in rank 0's memory while it is written.)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from moeco.checkpoint import checkpoint_state_dict
from moeco.parallel.expert_parallel import EXPERT_TAG, apply_expert_parallel
from moeco.parallel.mesh import Mesh, MeshSpec


def _expert_offsets(model) -> dict[str, int]:
    """checkpoint prefix 'model.layers.i.mlp.experts' -> first expert this rank holds there."""
    return {f"model.layers.{layer_id}.mlp.experts": moe.experts.first_expert for layer_id, moe in model.moe_layers()}


def _split_state(model) -> tuple[dict, dict]:
    """(replicated tensors, this rank's expert tensors renamed to the layer's expert ids)."""
    offsets = _expert_offsets(model)
    tensors = checkpoint_state_dict(model)
    rep, exp = {}, {}
    for name, t in tensors.items():
        if ".mlp.experts." in name:
            prefix, rest = name.split(".mlp.experts.", 1)
            j, tail = rest.split(".", 1)
            first = offsets[prefix + ".mlp.experts"]
            exp[f"{prefix}.mlp.experts.{int(j) + first}.{tail}"] = t
        else:
            rep[name] = t
    return rep, exp


def write_expert_shard(model, directory: Path, ep_rank: int, ep_size: int) -> dict[str, str]:
    """This rank's expert file in `directory`; returns its part of the weight map."""
    _, exp = _split_state(model)
    fname = f"model-{ep_rank + 2:05d}-of-{ep_size + 1:05d}.safetensors"
    save_file(exp, str(Path(directory) / fname), metadata={"format": "pt"})
    return {name: fname for name in exp}


def write_replicated(model, directory: Path, ep_size: int, expert_maps: list[dict], extra_files=None) -> None:
    """Rank 0: the replicated tensors, config.json, the index over every shard, extra files."""
    import shutil

    directory = Path(directory)
    rep, _ = _split_state(model)
    fname = f"model-00001-of-{ep_size + 1:05d}.safetensors"
    save_file(rep, str(directory / fname), metadata={"format": "pt"})
    weight_map = {name: fname for name in rep}
    for m in expert_maps:
        weight_map.update(m)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"ep_size": ep_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    hf = model.config.to_hf_dict()
    hf["torch_dtype"] = str(model.model.embed_tokens.weight.dtype).removeprefix("torch.")
    (directory / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    for name, src in (extra_files or {}).items():
        if isinstance(src, bytes):
            (directory / name).write_bytes(src)
        else:
            shutil.copyfile(src, directory / name)


def save_sharded(model, path: str | Path, mesh: Mesh, extra_files=None) -> Path:
    """Every rank calls it; ranks of the first EP group write their experts, rank 0 the rest, atomically.

    The files go to a staging directory `.tmp-NAME-ep` beside `path` that rank 0 renames to `path` at the end.
    """
    from moeco.fsutil import fsync_tree, publish_dir

    s = mesh.spec
    target = Path(path)
    stage = target.parent / f".tmp-{target.name}-ep"
    if s.rank == 0:
        import shutil

        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
    dist.barrier()
    part = write_expert_shard(model, stage, s.ep_rank, s.ep) if s.rank < s.ep else {}
    parts = [None] * s.world
    dist.all_gather_object(parts, part)
    if s.rank == 0:
        write_replicated(model, stage, s.ep, [p for p in parts if p], extra_files)
        fsync_tree(stage)
        publish_dir(stage, target)
    dist.barrier()
    return target


def _flat_params(optimizer) -> list:
    return [p for g in optimizer.param_groups for p in g["params"]]


def gather_optimizer_state(model, optimizer, mesh: Mesh, sd: dict) -> dict:
    """`sd` (optimizer.state_dict()) with each expert parameter's tensors gathered along dim 0 (every rank
    of the EP group gets the full state; rank 0 saves it)."""
    expert_ids = {id(p) for n, p in model.named_parameters() if EXPERT_TAG in n}
    params = _flat_params(optimizer)
    for i, p in enumerate(params):
        if id(p) not in expert_ids or i not in sd["state"]:
            continue
        st = sd["state"][i] = dict(sd["state"][i])  # state_dict() shares the live per-parameter dicts
        for key, t in list(st.items()):
            if torch.is_tensor(t) and t.shape == p.shape:
                parts = [torch.empty_like(t) for _ in range(mesh.spec.ep)]
                dist.all_gather(parts, t.contiguous(), group=mesh.ep_group)
                st[key] = torch.cat(parts)
    return sd


def shard_optimizer_state(model, optimizer, sd: dict) -> dict:
    """The inverse on load: slice each expert parameter's full state tensors to this rank's range."""
    params = _flat_params(optimizer)
    first_of = {}
    for _, moe in model.moe_layers():
        for p in moe.experts.parameters():
            first_of[id(p)] = moe.experts.first_expert
    for i, p in enumerate(params):
        if id(p) not in first_of or i not in sd["state"]:
            continue
        first, n = first_of[id(p)], p.shape[0]
        sd["state"][i] = dict(sd["state"][i])
        for key, t in list(sd["state"][i].items()):
            if torch.is_tensor(t) and t.dim() == p.dim() and t.shape[1:] == p.shape[1:] and t.shape[0] != n:
                sd["state"][i][key] = t[first:first + n].clone()
    return sd


def load_expert_parallel(path, ep: int, gpus_per_node: int = 0, dispatcher: str = "two_hop", fp8: bool = False,
                         device: str = "cpu", timeout_s: float = 600.0, **load_kwargs):
    """Under torchrun: (model holding this rank's experts with an EP dispatcher, Mesh, Dist) for inference.

    Every rank must then run the same forwards (e.g. generate the same prompts with the same seed);
    each reads only its experts from the checkpoint. Errors in the arguments or the checkpoint's
    expert count are raised on every rank before any collective.
    """
    from moeco.checkpoint import load_pretrained
    from moeco.config import ModelConfig, read_config_json
    from moeco.parallel.dist import Dist, agree

    spec = MeshSpec.from_env(ep, gpus_per_node)
    spec.check_model(ModelConfig.from_hf(read_config_json(Path(path))[0]))
    d = Dist(device, timeout_s=timeout_s)
    model = agree(lambda: load_pretrained(path, device=d.device, ep_rank=spec.ep_rank, ep_size=spec.ep, **load_kwargs),
                  d.world)
    mesh = Mesh(spec)
    apply_expert_parallel(model, mesh, dispatcher, fp8=fp8)
    return model, mesh, d
