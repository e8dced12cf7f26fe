"""The tokenizer: a byte-level BPE trained offline with `tokenizers`, or an existing one used as-is.

A trained tokenizer reserves id 0 for `<|bos|>` and id 1 for `<|eos|>` (the ids DeepSeek configs
use); documents are joined with `<|eos|>` when packed. It is saved as `tokenizer.json` plus a small
`tokenizer_config.json`, so both `tokenizers.Tokenizer.from_file` and transformers'
`AutoTokenizer.from_pretrained` read the model directory. The config carries moeco's default chat
template (moeco.chat_template), which `moeco serve` uses for /v1/chat/completions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from moeco.errors import DataError

BOS, EOS = "<|bos|>", "<|eos|>"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def train_bpe(documents: list[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE of at most `vocab_size` tokens (fewer if the text runs out of merges)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BOS, EOS], min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer, length=len(documents))
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    """A `tokenizer.json` file or a directory holding one (an HF tokenizer directory)."""
    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    if not file.is_file():
        raise DataError(f"tokenizer {path!r} not found; pass a tokenizer.json or a directory holding one "
                        f"(or leave data.tokenizer empty to train one)")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as exc:  # tokenizers raises a bare Exception on a malformed file
        raise DataError(f"tokenizer {str(file)!r} cannot be read ({exc}); pass a tokenizers JSON file") from None


def special_ids(tok: Tokenizer, source: str = "") -> tuple[int | None, int | None]:
    """(bos, eos) ids: ours, else what an HF tokenizer_config.json names, else None."""
    names = {"bos": BOS, "eos": EOS}
    config = Path(source) / "tokenizer_config.json" if source and Path(source).is_dir() else None
    if config is not None and config.is_file():
        raw = json.loads(config.read_text())
        for key in names:
            value = raw.get(f"{key}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                names[key] = value
    return tok.token_to_id(names["bos"]), tok.token_to_id(names["eos"])


def save_tokenizer(tok: Tokenizer, directory: Path, source: str = "") -> None:
    """Write the tokenizer into `directory`: a copy of the source files, or ours plus a config."""
    directory.mkdir(parents=True, exist_ok=True)
    src = Path(source) if source else None
    if src is not None and src.is_dir():
        for name in _TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, directory / name)
        return
    tok.save(str(directory / "tokenizer.json"))
    from moeco.chat_template import DEFAULT_CHAT_TEMPLATE

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
              "clean_up_tokenization_spaces": False, "chat_template": DEFAULT_CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
