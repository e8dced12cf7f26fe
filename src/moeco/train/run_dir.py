"""The run directory OUT, and every check made before anything in it is written.

    OUT/train_config.toml   the full TrainConfig (the tokenizer's vocab and special ids in [model])
    OUT/tokenizer/          tokenizer.json (+ tokenizer_config.json)
    OUT/data/               tokens.bin + tokens.json: the tokenized corpus, so a resume reads the same data
    OUT/checkpoints/        see checkpointing.py
    OUT/metrics.jsonl, OUT/plots/, OUT/model/
    OUT/.moeco-run.json     the marker: this directory is a run moeco train made (--overwrite needs it)
    OUT/.lock               flock'ed by the trainer that writes OUT (holds its pid)

`prepare_run` validates the options against the world size, the model and OUT, and (on rank 0)
reads, tokenizes and packs the data in memory; only when all of that succeeded does rank 0 write to
OUT. A bad input therefore raises a one-line `ConfigError`/`DataError` with OUT untouched. The other
ranks learn rank 0's outcome by a broadcast and raise the same error.

`--overwrite` removes only the files moeco train writes (by name: tokens.bin, loss.png, step-N/, ...)
and only in a directory holding the marker; anything else in OUT, a corpus in OUT/data included,
stays. A directory holding `data/`, `model/`, ... without the marker is refused, never cleaned.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from moeco.config import ModelConfig
from moeco.errors import ConfigError, DataError, MoecoError
from moeco.model.transformer import param_count
from moeco.resources import check_fits
from moeco.train.checkpointing import CheckpointManager
from moeco.train.config import TrainConfig
from moeco.train.corpus import load_documents
from moeco.train.data import BatchLoader, PackedData, load_stream, pack, save_stream
from moeco.train.tokenizer import load_tokenizer, save_tokenizer, special_ids, train_bpe

# Options a resumed run must share with the run it continues (they fix the data and its order).
LOCKED_ON_RESUME = ("data_path", "tokenizer", "seq_len", "val_fraction", "batch_size", "seed", "preset")
_RUN_ARTIFACTS = ("train_config.toml", "checkpoints", "model", "metrics.jsonl", "plots", "data", "tokenizer")
MARKER = ".moeco-run.json"
LOCK = ".lock"
_CONFIG_HEADER = "# written by moeco train"
# What moeco train writes, by folder: the only names --overwrite removes.
_TOKENIZER_NAMES = r"tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json"
_OWNED = {
    ".": re.compile(r"^(train_config\.toml|metrics\.jsonl|\.train_config\.toml\.\d+|\.metrics\.jsonl\.\d+"
                    r"|\.model\.tmp-\w+|\.old-model-\w+)$"),
    "data": re.compile(r"^(tokens\.bin|tokens\.json|\.tokens\.(bin|json)\.\d+)$"),
    "tokenizer": re.compile(rf"^({_TOKENIZER_NAMES})$"),
    "plots": re.compile(r"^(loss\.png|expert_load\.png)$"),
    "model": re.compile(r"^(config\.json|model\.safetensors|model\.safetensors\.index\.json"
                        rf"|model-\d{{5}}-of-\d{{5}}\.safetensors|{_TOKENIZER_NAMES})$"),
    "checkpoints": re.compile(r"^(step-\d{8}|\.tmp-step-\d{8}-\d+|\.old-step-\d{8}-\w+|\.corrupt-step-\d{8}.*)$"),
}
# The smallest vocabulary a trained byte-level BPE can have: 256 bytes + <|bos|> + <|eos|>.
MIN_BPE_VOCAB = 258

log = logging.getLogger(__name__)


@dataclass
class RunDir:
    out: Path
    cfg: TrainConfig
    model_config: ModelConfig
    data: PackedData
    data_source: str
    resume_from: Path | None
    lock: "RunLock | None" = None

    def release(self) -> None:
        """Let another trainer have OUT (the lock also goes when the process ends)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def tokenizer_files(self) -> dict[str, Path]:
        tok = self.out / "tokenizer"
        return {p.name: p for p in sorted(tok.iterdir()) if p.is_file()} if tok.is_dir() else {}


def holds_run(out: Path) -> bool:
    """OUT is a run directory moeco train made (its marker, or a train_config.toml moeco wrote)."""
    if not out.is_dir():
        return False
    if (out / MARKER).is_file():
        return True
    try:
        with open(out / "train_config.toml") as f:
            return f.readline().startswith(_CONFIG_HEADER)
    except (OSError, UnicodeDecodeError):
        return False


def foreign_artifacts(out: Path) -> list[str]:
    """Names moeco train would write that OUT already holds although moeco did not make OUT."""
    if not out.is_dir() or holds_run(out):
        return []
    return [name + ("/" if (out / name).is_dir() else "") for name in _RUN_ARTIFACTS if (out / name).exists()]


def remove_run_files(out: Path) -> None:
    """--overwrite: delete what moeco train wrote into OUT, by name; a folder goes only once empty."""
    for folder, owned in _OWNED.items():
        where = out / folder
        if not where.is_dir():
            continue
        if folder == "model" and not all(owned.match(p.name) for p in where.iterdir()):
            continue  # also holds the user's files: the new model replaces only moeco's (save_pretrained)
        for path in where.iterdir():
            if owned.match(path.name):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
        if folder != "." and not any(where.iterdir()):
            where.rmdir()


class RunLock:
    """An exclusive flock on OUT/.lock, so two trainers never write one run directory."""

    def __init__(self, out: Path) -> None:
        import fcntl

        path = out / LOCK
        self._file = open(path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise ConfigError(f"--out {str(out)!r} is in use by another moeco train (pid {holder}, holding "
                              f"{str(path)!r}); wait for it to finish, stop it, or choose another --out") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            self._file.close()  # closing the descriptor drops the flock


def check_writable(out: Path) -> None:
    """--out can be created and written: checked before the data is read and tokenized."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} is a file; pass a directory")
    base = out
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"--out {str(out)!r} cannot be created: {str(base)!r} is a file, not a folder; "
                          f"choose another --out")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:
        raise ConfigError(f"--out {str(out)!r} cannot be written ({exc.strerror} in {str(base)!r}); "
                          f"choose a folder you can write to") from None


def check_memory(cfg: TrainConfig, mcfg: ModelConfig, device) -> None:
    """Weights, gradients and AdamW moments must fit on the device before the model is built."""
    n = param_count(mcfg)
    per_param = 4 + 4 + (4 if cfg.moment_dtype() == "bf16" else 8)
    check_fits(n * per_param, device,
               f"training this model (model.preset = {cfg.preset!r}, {n / 1e6:,.1f}M parameters) would hold "
               f"weights, gradients and AdamW moments ({per_param} bytes per parameter, before activations), which",
               "choose a smaller model (e.g. --preset tiny, or lower model.num_hidden_layers) or a device with "
               "more memory")


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
    check_memory(cfg, check_model(cfg), dist.device)
    check_writable(out)
    if resume:
        return _prepare_resume(cfg, out, dist)
    foreign = foreign_artifacts(out)
    if foreign:
        raise ConfigError(f"--out {str(out)!r} holds {', '.join(foreign)} that moeco train did not write (no "
                          f"{MARKER}); moeco train writes its run there and --overwrite never deletes files it did "
                          f"not write: choose another --out, or move those away")
    if holds_run(out) and not overwrite:
        raise ConfigError(f"{str(out)!r} already holds a training run; continue it with `moeco train --resume "
                          f"{out}`, pass --overwrite to start over (it removes only the files moeco train wrote), "
                          f"or choose another --out")
    if not cfg.tokenizer and cfg.model_config().vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(f"model.vocab_size = {cfg.model_config().vocab_size} is too small for the byte-level BPE "
                          f"moeco trains: it needs at least {MIN_BPE_VOCAB} (256 bytes + <|bos|> + <|eos|>); set "
                          f"model.vocab_size >= {MIN_BPE_VOCAB} or pass data.tokenizer")
    failure, prepared = None, None
    if dist.main:
        try:
            prepared = _read_and_tokenize(cfg)
        except MoecoError as exc:
            failure = exc
    _share_outcome(dist, failure)
    lock = None
    if dist.main:
        cfg, stream, tok, tok_source, source = prepared
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out)
        if overwrite:
            remove_run_files(out)
        _write_marker(out)
        save_tokenizer(tok, out / "tokenizer", tok_source)
        save_stream(stream, out / "data", {"source": source})
        _write_config(cfg, out)
    dist.barrier()
    cfg = TrainConfig.from_toml(out / "train_config.toml")
    stream, meta = load_stream(out / "data")
    data = PackedData.build(stream, cfg.seq_len, cfg.val_fraction)
    return RunDir(out, cfg, check_model(cfg), data, meta.get("source", ""), None, lock)


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
    vocab = padded_vocab(tok.get_vocab_size())
    if vocab != mcfg.vocab_size:
        why = ("the tokenizer given in data.tokenizer has" if cfg.tokenizer else
               "the BPE trained on this text has only")
        log.warning(f"note: model.vocab_size = {mcfg.vocab_size} became {vocab}: {why} {tok.get_vocab_size()} "
                    f"tokens, rounded up to a multiple of {VOCAB_MULTIPLE}")
    cfg = cfg.replace(model_overrides={**cfg.model_overrides, "vocab_size": vocab,
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


def _write_marker(out: Path) -> None:
    if not (out / MARKER).is_file():
        (out / MARKER).write_text(json.dumps({"written_by": "moeco train", "contents": list(_RUN_ARTIFACTS)}) + "\n")


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
    latest, damaged = None, []
    for step in reversed(ckpt.steps()):
        problem = ckpt.problem(ckpt.path(step))
        if problem is None:
            latest = ckpt.path(step)
            break
        damaged.append((ckpt.path(step), problem))
    if latest is None:
        raise ConfigError(f"{str(out)!r} has no complete checkpoint to resume from"
                          + (f" ({damaged[0][0].name} is damaged: {damaged[0][1]})" if damaged else "")
                          + "; start the run again with --overwrite")
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
    lock = None
    if dist_info.main:
        lock = RunLock(out)
        for path, problem in damaged:  # moved aside, so the resumed run writes that step afresh
            aside = path.with_name(f".corrupt-{path.name}")
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(path, aside)
            log.warning(f"warning: checkpoint {str(path)!r} is damaged ({problem}); resuming from the previous "
                        f"complete one, {latest.name}; the damaged one is kept as {aside.name}")
        ckpt.remove_partial()
        _write_marker(out)  # a run started before the marker existed gets one
        _write_config(cfg, out)
    dist_info.barrier()
    return RunDir(out, cfg, mcfg, data, meta.get("source", ""), latest, lock)
