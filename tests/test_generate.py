"""Sampling rules, stopping at eos, and the generate/demo command lines."""

import pytest
import torch

import moeco
from moeco.generate import generate
from helpers import micro_config
from moeco.cli import main
from moeco.sampling import sample_next


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert (sample_next(logits, 0.0) == 1).all()
    assert (sample_next(logits, 1.0, top_k=1, generator=g) == 1).all()
    assert (sample_next(logits, 1.0, top_p=0.01, generator=g) == 1).all()
    two = sample_next(logits, 1.0, top_k=2, generator=g)
    assert set(two.tolist()) == {1, 3}
    # top_p = 0.9 keeps the smallest prefix whose mass reaches 0.9: tokens 1, 3, 2 (0.665+0.245+0.090)
    assert set(sample_next(logits, 1.0, top_p=0.9, generator=g).tolist()) <= {1, 3, 2}
    assert 0 not in sample_next(logits, 1.0, top_p=0.9, generator=g).tolist()


def test_generate_stops_at_eos_and_pads_finished_rows():
    cfg = micro_config()
    torch.manual_seed(11)
    model = moeco.Transformer(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (2, 4))
    free = generate(model, prompt, 6)
    eos = int(free[0, 5])  # row 0's second new token
    out = generate(model, prompt, 6, eos_token_id=eos)
    assert out.shape[1] <= 10 and (out[0, 5:] == eos).all()
    assert model.training  # generate restores the mode it found


def test_demo_and_generate_cli(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    printed = capsys.readouterr().out
    assert "latent cache: 48 values/token/layer = 768 bytes/token" in printed
    assert main(["generate", str(tmp_path / "demo"), "--prompt-ids", "1,2,3", "--max-new-tokens", "4"]) == 0
    assert len(capsys.readouterr().out.splitlines()[0].split()) == 7
    # user mistakes: one line, exit code 2
    assert main(["generate", str(tmp_path / "missing"), "--prompt-ids", "1"]) == 2
    assert main(["generate", str(tmp_path / "demo"), "--prompt-ids", "1,x"]) == 2
    assert main(["generate", str(tmp_path / "demo"), "--prompt-ids", "99999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("moeco generate: error: ") for line in err)


def test_vocab_limit_keeps_sampling_inside_the_tokenizer():
    """A padded output head (trainer: vocab rounded up to 128) never yields ids the tokenizer lacks."""
    cfg = micro_config()
    torch.manual_seed(0)
    model = moeco.Transformer(cfg)
    with torch.no_grad():  # make the padded ids the most likely ones
        model.lm_head.weight[cfg.vocab_size - 8:] *= 50
    ids = torch.randint(0, cfg.vocab_size - 8, (2, 3))
    gen = torch.Generator().manual_seed(0)
    free = generate(model, ids, 12, temperature=1.0, generator=gen)
    limited = generate(model, ids, 12, temperature=1.0, generator=torch.Generator().manual_seed(0),
                             vocab_limit=cfg.vocab_size - 8)
    assert (free[:, 3:] >= cfg.vocab_size - 8).any()  # the check can fail: without the limit they appear
    assert (limited[:, 3:] < cfg.vocab_size - 8).all()


def test_trainer_pads_vocab_to_128():
    from moeco.train.run_dir import padded_vocab

    assert [padded_vocab(n) for n in (1, 128, 129, 16899, 129280)] == [128, 128, 256, 16896 + 128, 129280]


def test_prompts_of_different_lengths_generate_what_each_generates_alone():
    from helpers import sharp_attention

    cfg = micro_config()
    torch.manual_seed(12)
    model = sharp_attention(moeco.Transformer(cfg), seed=12)
    prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (1, 5, 11, 4)]
    together = generate(model, prompts, 9)
    alone = [generate(model, torch.tensor([p]), 9)[0].tolist() for p in prompts]
    assert together == alone
    assert [len(t) for t in together] == [10, 14, 20, 13]


@pytest.mark.parametrize("kwargs, field", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_k=-2), "top_k"),
    (dict(prompts=[[1, 2], []]), "prompt 1 is empty"), (dict(prompts=[[1, 999]]), "token id 999"),
    (dict(max_new_tokens=300), "max_position_embeddings"), (dict(prompts=torch.zeros(3)), "shape"),
])
def test_generate_rejects_bad_arguments_with_one_line(kwargs, field):
    model = moeco.Transformer(micro_config())
    args = dict(prompts=[[1, 2, 3]], max_new_tokens=4)
    args.update(kwargs)
    with pytest.raises(moeco.ConfigError) as err:
        generate(model, args.pop("prompts"), args.pop("max_new_tokens"), **args)
    assert field in str(err.value) and "\n" not in str(err.value)
