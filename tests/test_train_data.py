"""Training data: corpus readers, tokenizer round-trip, packing, split and the resumable loader."""

import json

import numpy as np
import pytest
import torch

from moeco.errors import DataError
from moeco.train.corpus import _module_doc, load_documents
from moeco.train.data import BatchLoader, PackedData, load_stream, pack, rank_slice, save_stream
from moeco.train.tokenizer import BOS, EOS, load_tokenizer, save_tokenizer, special_ids, train_bpe

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 20,
    "def add(a, b):\n    return a + b  # ünïcödé and emoji 🙂\n" * 10,
    "Tokenizers split text into pieces; BPE merges the most frequent pairs. " * 15,
]


def test_tokenizer_round_trips_and_reserves_special_ids(tmp_path):
    tok = train_bpe(TEXTS, vocab_size=400)
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    for text in TEXTS + ["unseen words: zebra quixotic 12345 \t\n tabs", "日本語のテキスト"]:
        assert tok.decode(tok.encode(text).ids) == text
    save_tokenizer(tok, tmp_path / "tok")
    again = load_tokenizer(str(tmp_path / "tok"))
    assert again.encode(TEXTS[1]).ids == tok.encode(TEXTS[1]).ids
    assert special_ids(again, str(tmp_path / "tok")) == (0, 1)
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(str(tmp_path / "nothing"))


def test_user_data_formats_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n\n" + json.dumps({"text": "third"}))
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    docs, _ = load_documents(str(tmp_path))
    assert docs == ["first document", "second", "third"]
    assert load_documents(str(tmp_path / "a.txt"))[0] == ["first document"]

    with pytest.raises(DataError, match="does not exist"):
        load_documents(str(tmp_path / "missing"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": 3}\n')
    with pytest.raises(DataError, match="line 2 has no string 'text'"):
        load_documents(str(tmp_path / "bad.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    with pytest.raises(DataError, match="line 1 is not valid JSON"):
        load_documents(str(tmp_path / "broken.jsonl"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "blank.txt").write_text("  \n\n")
    with pytest.raises(DataError, match="holds no text"):
        load_documents(str(tmp_path / "empty"))
    (tmp_path / "nofiles").mkdir()
    with pytest.raises(DataError, match="has no .txt"):
        load_documents(str(tmp_path / "nofiles"))


def test_module_docstrings_are_read_without_importing(tmp_path):
    src = tmp_path / "m.py"
    src.write_text('"""Top."""\nraise SystemExit("imported!")\nclass A:\n    """Doc A."""\n'
                   '    def f(self):\n        """Doc f."""\n    def _hidden(self):\n        """no"""\n')
    doc = _module_doc(src, "m")
    assert doc.startswith("m\n\nTop.") and "m.A\n    Doc A." in doc and "m.A.f\n    Doc f." in doc
    assert "no" not in doc.split("Doc f.")[1]


def test_pack_split_are_deterministic_and_disjoint():
    docs = [[5, 6, 7], [8, 9], list(range(10, 60))]
    stream = pack(docs, eos_id=1)
    assert stream.tolist()[:9] == [5, 6, 7, 1, 8, 9, 1, 10, 11] and stream[-1] == 1
    data = PackedData.build(stream, seq_len=4, val_fraction=0.2)
    again = PackedData.build(stream.copy(), seq_len=4, val_fraction=0.2)
    assert torch.equal(data.train_index, again.train_index) and torch.equal(data.val_index, again.val_index)
    n = (len(stream) - 1) // 4
    assert sorted(data.train_index.tolist() + data.val_index.tolist()) == list(range(n))
    seqs = data.sequences(torch.tensor([0, 2]))
    assert seqs.shape == (2, 5) and seqs[1].tolist() == stream[8:13].tolist()
    with pytest.raises(DataError, match="too few"):
        PackedData.build(stream[:6], seq_len=4, val_fraction=0.2)


def test_loader_is_deterministic_resumable_and_covers_each_epoch():
    a = BatchLoader(n_train=10, batch_size=3, seed=7)
    b = BatchLoader(n_train=10, batch_size=3, seed=7)
    first = [a.next_batch().tolist() for _ in range(3)]
    assert first == [b.next_batch().tolist() for _ in range(3)]
    assert len(set(sum(first, []))) == 9  # one epoch: no repeats, the tail of 1 is skipped
    state = a.state_dict()
    assert (state["epoch"], state["position"]) == (0, 9)
    rest = [a.next_batch().tolist() for _ in range(5)]
    c = BatchLoader(n_train=10, batch_size=3, seed=7)
    c.load_state_dict(state)
    assert [c.next_batch().tolist() for _ in range(5)] == rest
    other = BatchLoader(n_train=10, batch_size=3, seed=8)
    assert [other.next_batch().tolist() for _ in range(3)] != first
    with pytest.raises(DataError, match="batch size"):
        BatchLoader(n_train=10, batch_size=2, seed=7).load_state_dict(state)
    with pytest.raises(DataError, match="fewer than train.batch_size"):
        BatchLoader(n_train=2, batch_size=3, seed=0)


def test_rank_slices_cover_the_global_batch_once():
    batch = torch.arange(12)
    world, micro, accum = 2, 3, 2
    parts = [rank_slice(batch, a, r, world, micro) for a in range(accum) for r in range(world)]
    assert sorted(torch.cat(parts).tolist()) == list(range(12))


def test_token_cache_round_trip(tmp_path):
    stream = np.arange(1000, dtype=np.uint16)
    save_stream(stream, tmp_path / "data", {"source": "x"})
    back, meta = load_stream(tmp_path / "data")
    assert np.array_equal(back, stream) and meta["source"] == "x" and meta["dtype"] == "uint16"


@pytest.mark.slow
def test_embedded_corpus_is_stable():
    docs, source = load_documents("")
    again, _ = load_documents("")
    assert docs == again and "stdlib" in source
    assert sum(map(len, docs)) > 1_000_000
