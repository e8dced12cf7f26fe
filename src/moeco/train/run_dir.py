"""The run directory OUT, and every check made before anything in it is written.

    OUT/train_config.toml   the full TrainConfig (the tokenizer's vocab and special ids in [model])
    OUT/tokenizer/          tokenizer.json (+ tokenizer_config.json)
    OUT/data/               tokens.bin + tokens.json: the tokenized corpus, so a resume reads the same data
    OUT/checkpoints/        see checkpointing.py
    OUT/metrics.jsonl, OUT/plots/, OUT/model/

`prepare_run` validates the options against the world size, the model and OUT, and (on rank 0)
reads, tokenizes and packs the data in memory; only when all of that succeeded does rank 0 write to
OUT. A bad input therefore raises a one-line `ConfigError`/`DataError` with OUT untouched. The other
ranks learn rank 0's outcome by a broadcast and raise the same error.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from moeco.config import ModelConfig
from moeco.errors import ConfigError, DataError, MoecoError
from moeco.train.checkpointing import CheckpointManager
from moeco.train.config import TrainConfig
from moeco.train.corpus import load_documents
from moeco.train.data import BatchLoader, PackedData, load_stream, pack, save_stream
from moeco.train.tokenizer import load_tokenizer, save_tokenizer, special_ids, train_bpe

# Options a resumed run must share with the run it continues (they fix the data and its order).
LOCKED_ON_RESUME = ("data_path", "tokenizer", "seq_len", "val_fraction", "batch_size", "seed", "preset")
_RUN_ARTIFACTS = ("train_config.toml", "checkpoints", "model", "metrics.jsonl", "plots", "data", "tokenizer")


@dataclass
class RunDir:
    out: Path
    cfg: TrainConfig
    model_config: ModelConfig
    data: PackedData
    data_source: str
    resume_from: Path | None

    def tokenizer_files(self) -> dict[str, Path]:
        tok = self.out / "tokenizer"
        return {p.name: p for p in sorted(tok.iterdir()) if p.is_file()} if tok.is_dir() else {}


def holds_run(out: Path) -> bool:
    return out.is_dir() and any((out / name).exists() for name in _RUN_ARTIFACTS)


def resume_config(out: str | Path, assignments: list[str]) -> TrainConfig:
    """The config a resumed run uses: OUT/train_config.toml with this invocation's overrides."""
    out = Path(out)
    if not (out / "train_config.toml").is_file():
        raise ConfigError(f"{str(out)!r} holds no training run (no train_config.toml); "
                          f"start one with `moeco train --out {out}`")
    return TrainConfig.from_toml(out / "train_config.toml").with_overrides(assignments)


def check_world(cfg: TrainConfig, world: int) -> None:
    micro = cfg.micro_batch_size or cfg.batch_size // world
    if micro < 1 or cfg.batch_size % (world * micro):
        raise ConfigError(
            f"train.batch_size = {cfg.batch_size} does not divide across {world} rank(s)"
            + (f" x micro_batch_size {cfg.micro_batch_size}" if cfg.micro_batch_size else "")
            + f"; use a multiple of {world * (cfg.micro_batch_size or 1)}")


def check_model(cfg: TrainConfig) -> ModelConfig:
    mcfg = cfg.model_config()
    if cfg.seq_len > mcfg.max_position_embeddings:
        raise ConfigError(f"data.seq_len = {cfg.seq_len} exceeds the model's max_position_embeddings = "
                          f"{mcfg.max_position_embeddings}; lower seq_len or set model.max_position_embeddings")
    return mcfg


def prepare_run(cfg: TrainConfig, out: Path, *, resume: bool, overwrite: bool, dist) -> RunDir:
    check_world(cfg, dist.world)
    check_model(cfg)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; pass a directory")
    if resume:
        return _prepare_resume(cfg, out, dist)
    if holds_run(out) and not overwrite:
        raise ConfigError(f"{str(out)!r} already holds a training run; continue it with `moeco train --resume "
                          f"{out}`, pass --overwrite to start over, or choose another --out")
    failure, prepared = None, None
    if dist.main:
        try:
            prepared = _read_and_tokenize(cfg)
        except MoecoError as exc:
            failure = exc
    _share_outcome(dist, failure)
    if dist.main:
        cfg, stream, tok, tok_source, source = prepared
        if overwrite:
            for name in _RUN_ARTIFACTS:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        save_tokenizer(tok, out / "tokenizer", tok_source)
        save_stream(stream, out / "data", {"source": source})
        _write_config(cfg, out)
    dist.barrier()
    cfg = TrainConfig.from_toml(out / "train_config.toml")
    stream, meta = load_stream(out / "data")
    data = PackedData.build(stream, cfg.seq_len, cfg.val_fraction)
    return RunDir(out, cfg, check_model(cfg), data, meta.get("source", ""), None)


VOCAB_MULTIPLE = 128


def padded_vocab(n_tokens: int) -> int:
    """The model's vocab_size for a tokenizer of n_tokens: rounded up to a multiple of 128.

    An output head whose width is not a multiple of 8 sends cuBLAS to slow unaligned kernels (on the
    H200 the 16,899-wide head of `small` took 40 of 333 ms per step); 128 also suits FP8 blocks.
    The extra ids never occur in the data, and `moeco generate` never samples them.
    """
    return -(-n_tokens // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _read_and_tokenize(cfg: TrainConfig):
    documents, source = load_documents(cfg.data_path)
    mcfg = cfg.model_config()
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    else:
        tok = train_bpe(documents, mcfg.vocab_size)
    bos, eos = special_ids(tok, cfg.tokenizer)
    ids = [e.ids for e in tok.encode_batch(documents)]
    stream = pack(ids, eos)
    data = PackedData.build(stream, cfg.seq_len, cfg.val_fraction)
    BatchLoader(len(data.train_index), cfg.batch_size, cfg.seed)  # raises if the corpus is too small
    cfg = cfg.replace(model_overrides={**cfg.model_overrides, "vocab_size": padded_vocab(tok.get_vocab_size()),
                                       "bos_token_id": bos, "eos_token_id": eos})
    check_model(cfg)
    return cfg, stream, tok, cfg.tokenizer, source


def _share_outcome(dist_info, failure: MoecoError | None) -> None:
    """Rank 0 tells the others whether preparing the data failed, so every rank raises the same error."""
    if dist_info.world > 1:
        box = [None if failure is None else (type(failure).__name__, str(failure))]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and failure is None:
            kind = {"DataError": DataError}.get(box[0][0], ConfigError)
            raise kind(box[0][1])
    if failure is not None:
        raise failure


def _write_config(cfg: TrainConfig, out: Path) -> None:
    tmp = out / f".train_config.toml.{os.getpid()}"
    tmp.write_text("# written by moeco train; `moeco train --resume OUT` reads it back\n" + cfg.to_toml())
    os.replace(tmp, out / "train_config.toml")


def _prepare_resume(cfg: TrainConfig, out: Path, dist_info) -> RunDir:
    saved = resume_config(out, [])
    for name in LOCKED_ON_RESUME:
        if getattr(cfg, name) != getattr(saved, name):
            raise ConfigError(f"cannot resume {str(out)!r} with {name} = {getattr(cfg, name)!r}: the run was "
                              f"started with {getattr(saved, name)!r}; keep it, or start a new --out")
    ckpt = CheckpointManager(out / "checkpoints", cfg.keep_checkpoints)
    latest = ckpt.latest()
    if latest is None:
        raise ConfigError(f"{str(out)!r} has no complete checkpoint to resume from; start the run again "
                          f"with --overwrite")
    mcfg = check_model(cfg)
    saved_model = ModelConfig.from_hf(latest / "model" / "config.json")
    for f in dataclasses.fields(ModelConfig):
        if f.name in ("extra",):
            continue
        if getattr(saved_model, f.name) != getattr(mcfg, f.name):
            raise ConfigError(
                f"checkpoint {str(latest)!r} has model {f.name} = {getattr(saved_model, f.name)!r} but this run "
                f"asks for {getattr(mcfg, f.name)!r}; resume with the run's own model settings or start a new --out")
    if cfg.steps < int(latest.name.split("-")[1]):
        raise ConfigError(f"train.steps = {cfg.steps} is below the checkpoint's step {latest.name}; "
                          f"raise --steps to continue training")
    stream, meta = load_stream(out / "data")
    data = PackedData.build(stream, cfg.seq_len, cfg.val_fraction)
    dist_info.barrier()
    if dist_info.main:
        ckpt.remove_partial()
        _write_config(cfg, out)
    dist_info.barrier()
    return RunDir(out, cfg, mcfg, data, meta.get("source", ""), latest)
