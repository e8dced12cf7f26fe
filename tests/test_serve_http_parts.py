"""The HTTP server's parts without a server: detokenizer, chat templates, request validation."""

import json

import pytest

from moeco.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate, ChatTemplateError
from moeco.serve.detokenizer import IncrementalDetokenizer
from moeco.serve.openai_protocol import APIError, ChatCompletionRequest, CompletionRequest, parse


@pytest.fixture(scope="module")
def tokenizer():
    from serve_http_helpers import reference_text
    from moeco.train.tokenizer import train_bpe

    return train_bpe(reference_text() + ["naïve café — 東京 🙂 " * 3], 400)


def _stream(tok, ids, stop=None, step=1):
    d = IncrementalDetokenizer(tok, stop)
    pieces = []
    for i in range(0, len(ids), step):
        chunk = ids[i:i + step]
        pieces.append(d.add(chunk, final=i + step >= len(ids)))
        if d.stopped:
            break
    return pieces, d


@pytest.mark.parametrize("step", [1, 3])
def test_detokenizer_streams_multibyte_text_exactly(tokenizer, step):
    text = "A naïve café in 東京 says 🙂 and ends."
    ids = tokenizer.encode(text).ids
    assert len(ids) > len(text) // 3  # byte-level pieces: characters span several tokens
    pieces, _ = _stream(tokenizer, ids, step=step)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)  # no half characters ever sent


def test_detokenizer_flushes_an_unfinished_character_at_the_end(tokenizer):
    ids = tokenizer.encode("ok 🙂").ids
    cut = ids[:-1]  # the emoji's last byte is missing
    pieces, _ = _stream(tokenizer, cut)
    assert "".join(pieces) == tokenizer.decode(cut) and pieces[-1].endswith("\ufffd")


def test_detokenizer_cuts_at_stop_strings_and_holds_back_prefixes(tokenizer):
    text = "first line\nsecond STOP third"
    ids = tokenizer.encode(text).ids
    pieces, d = _stream(tokenizer, ids, stop=["STOP", "never"])
    assert "".join(pieces) == "first line\nsecond " and d.stopped
    assert not any("S" in p for p in pieces)  # "S", "ST", "STO" were held back, never sent
    pieces, d = _stream(tokenizer, ids, stop=["line\ns"])  # a stop string across tokens
    assert "".join(pieces) == "first " and d.stopped
    pieces, d = _stream(tokenizer, tokenizer.encode("ends with ST").ids, stop=["STOP"])
    assert "".join(pieces) == "ends with ST" and not d.stopped  # the held-back tail is flushed at the end


def test_chat_template_sources(tmp_path):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, {"role": "user", "content": "?"}]
    default = ChatTemplate.from_model_dir(None)
    assert default.render(msgs) == "User: hi\n\nAssistant: yo\n\nUser: ?\n\nAssistant:"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"content": "</s>"}, "bos_token": "<s>",
        "chat_template": [{"name": "tool_use", "template": "T"},
                          {"name": "default", "template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]"
                                                          "{{ m.content }}{{ eos_token }}{% endfor %}"}]}))
    assert ChatTemplate.from_model_dir(tmp_path).render(msgs[:2]) == "<s>[user]hi</s>[assistant]yo</s>"
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no ' + messages[0].role) }}")
    with pytest.raises(ChatTemplateError, match="no user"):
        ChatTemplate.from_model_dir(tmp_path).render(msgs)
    sneaky = ChatTemplate("{{ messages.__class__.__mro__[1].__subclasses__() }}")  # the sandbox refuses
    with pytest.raises(ChatTemplateError):
        sneaky.render(msgs)


def test_moeco_train_writes_the_default_template(tmp_path, tokenizer):
    from moeco.train.tokenizer import save_tokenizer

    save_tokenizer(tokenizer, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == DEFAULT_CHAT_TEMPLATE
    assert ChatTemplate.from_model_dir(tmp_path).render([{"role": "user", "content": "x"}]) == "User: x\n\nAssistant:"


def test_request_validation_names_the_field():
    ok = parse(CompletionRequest, {"model": "m", "prompt": [[1, 2], [3]], "stop": "\n", "n": 2, "seed": 5})
    assert ok.prompts() == [[1, 2], [3]] and ok.stop_list() == ["\n"]
    assert [ok.sampling_params(8, j).seed for j in range(2)] == [5, 6]
    chat = parse(ChatCompletionRequest, {"model": "m", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]})
    assert chat.conversation() == [{"role": "user", "content": "ab"}]
    for body, param in [({"model": "m", "prompt": "x", "top_k": -2}, "top_k"),
                        ({"model": "m", "prompt": "x", "temperature": "hot"}, "temperature"),
                        ({"model": "m", "prompt": "x", "n": True}, "n"),
                        ({"model": "m", "prompt": "x", "echo": True}, "echo"),
                        ({"model": "m", "prompt": []}, "prompt"),
                        ({"model": 3, "prompt": "x"}, "model")]:
        with pytest.raises(APIError) as exc:
            req = parse(CompletionRequest, body)
            req.prompts()
        assert exc.value.status == 400 and exc.value.param == param, (body, exc.value.body())
