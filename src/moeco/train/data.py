"""Token data: packing into fixed-length sequences, the train/validation split, a resumable loader.

Packing (GPT-style, as DeepSeek-V3: no cross-document masking):

    stream  = doc_0 <eos> doc_1 <eos> ...                         (N tokens)
    seq_i   = stream[i*S : i*S + S + 1]   for i < (N-1) // S      (S+1 tokens: inputs and shifted labels)

Split: a fixed permutation of the sequence indices (seeded with SPLIT_SEED, independent of the
training seed) puts round(val_fraction * n) of them in validation, so the split depends only on the
corpus, the tokenizer and S.

Loader: each epoch visits the training sequences in the order `randperm(n_train)` drawn from a
generator seeded by (seed, epoch); each optimizer step takes the next `batch_size` of them (a tail
shorter than a batch is skipped). Its whole state is (epoch, position), so a resumed run reads
exactly the batches an uninterrupted one would. A global batch is cut for data parallelism as

    global batch (B) = micro-steps (A) x ranks (R) x micro batch (b);  rank r, micro-step a reads
    rows [(a*R + r)*b, (a*R + r + 1)*b).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moeco.errors import DataError

SPLIT_SEED = 20261129


def pack(documents_ids: list[list[int]], eos_id: int | None) -> np.ndarray:
    """Concatenate tokenized documents into one stream, each followed by `eos_id` when there is one."""
    sep = [eos_id] if eos_id is not None else []
    total = sum(len(d) + len(sep) for d in documents_ids)
    dtype = np.uint16 if max((max(d) for d in documents_ids if d), default=0) < 2**16 else np.uint32
    stream = np.empty(total, dtype=dtype)
    pos = 0
    for ids in documents_ids:
        stream[pos:pos + len(ids)] = ids
        pos += len(ids)
        if sep:
            stream[pos] = eos_id
            pos += 1
    return stream


@dataclass
class PackedData:
    """The token stream cut into sequences of seq_len + 1, with a fixed train/validation split."""

    stream: np.ndarray
    seq_len: int
    train_index: torch.Tensor  # (n_train,) int64: sequence numbers
    val_index: torch.Tensor  # (n_val,)

    @classmethod
    def build(cls, stream: np.ndarray, seq_len: int, val_fraction: float) -> "PackedData":
        n = (len(stream) - 1) // seq_len
        if n < 2:
            raise DataError(f"the corpus has {len(stream)} tokens, too few for two sequences of seq_len "
                            f"{seq_len} (one to train, one to validate); add text or lower data.seq_len")
        n_val = min(n - 1, max(1, round(val_fraction * n)))
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
        return cls(stream, seq_len, perm[n_val:].sort().values, perm[:n_val].sort().values)

    def sequences(self, numbers: torch.Tensor) -> torch.Tensor:
        """(len(numbers), seq_len + 1) int64 token ids."""
        rows = [self.stream[i * self.seq_len: i * self.seq_len + self.seq_len + 1] for i in numbers.tolist()]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    @property
    def n_tokens(self) -> int:
        return len(self.stream)


class BatchLoader:
    """Global batches of training-sequence numbers, deterministic for a seed and resumable."""

    def __init__(self, n_train: int, batch_size: int, seed: int) -> None:
        if n_train < batch_size:
            raise DataError(f"only {n_train} training sequences, fewer than train.batch_size = {batch_size}; "
                            f"lower batch_size or data.seq_len, or add text")
        self.n_train, self.batch_size, self.seed = n_train, batch_size, seed
        self.epoch, self.position = 0, 0
        self._perm: tuple[int, torch.Tensor] | None = None

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n_train, generator=g))
        return self._perm[1]

    def next_batch(self) -> torch.Tensor:
        """(batch_size,) positions into the training set for the next optimizer step."""
        if self.position + self.batch_size > self.n_train:
            self.epoch, self.position = self.epoch + 1, 0
        batch = self._order(self.epoch)[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "n_train": self.n_train, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        if (state["n_train"], state["batch_size"]) != (self.n_train, self.batch_size):
            raise DataError(f"the checkpoint's loader saw {state['n_train']} sequences in batches of "
                            f"{state['batch_size']}, this run has {self.n_train} in batches of {self.batch_size}; "
                            f"resume with the data and batch size it was started with")
        self.epoch, self.position, self.seed = state["epoch"], state["position"], state["seed"]


def rank_slice(batch: torch.Tensor, micro_step: int, rank: int, world: int, micro: int) -> torch.Tensor:
    start = (micro_step * world + rank) * micro
    return batch[start:start + micro]


# ---- the token cache in OUT/data ---------------------------------------------------------
def save_stream(stream: np.ndarray, directory: Path, meta: dict) -> None:
    """Write tokens.bin + tokens.json (dtype, count, source) with fsync and rename."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".tokens.bin.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(stream.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / "tokens.bin")
    meta = {**meta, "dtype": str(stream.dtype), "n_tokens": int(len(stream))}
    tmp = directory / f".tokens.json.{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    os.replace(tmp, directory / "tokens.json")


def load_stream(directory: Path) -> tuple[np.ndarray, dict]:
    meta_file = directory / "tokens.json"
    if not meta_file.is_file() or not (directory / "tokens.bin").is_file():
        raise DataError(f"{str(directory)!r} has no token cache (tokens.json, tokens.bin); "
                        f"was this run started with `moeco train`?")
    meta = json.loads(meta_file.read_text())
    stream = np.fromfile(directory / "tokens.bin", dtype=np.dtype(meta["dtype"]))
    if len(stream) != meta["n_tokens"]:
        raise DataError(f"{str(directory / 'tokens.bin')!r} holds {len(stream)} tokens, tokens.json says "
                        f"{meta['n_tokens']}; the run directory is damaged, start a new run")
    return stream, meta
