"""CodecDispatcher inside the single-process model, and the training config's [parallel] codecs."""

import pytest
import torch

import moeco
from helpers import micro_config
from moeco.comm import CodecDispatcher, apply_codecs, get_codec
from moeco.errors import ConfigError
from moeco.model.moe import LocalDispatcher
from moeco.train.config import TrainConfig


def _model():
    torch.manual_seed(0)
    return moeco.Transformer(micro_config()).eval()


def test_no_codec_is_the_plain_model_and_codecs_change_it_a_little():
    model = _model()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        assert apply_codecs(model, "none", None) == 0
        for _, moe in model.moe_layers():
            moe.dispatcher = CodecDispatcher(moe.dispatcher)
        assert torch.equal(model(ids).logits, ref)
        errs = {}
        for name in ("e4m3", "logfmt8", "logfmt10"):
            for _, moe in model.moe_layers():
                moe.dispatcher = CodecDispatcher(moe.dispatcher.inner, name, name)
            out = model(ids).logits
            errs[name] = ((out - ref).norm() / ref.norm()).item()
    # a coded input can flip a near-tie in routing, which moves the logits by a few percent (2-7% for
    # E4M3 over seeds 0-5 of this micro model); a broken codec moves them by tens of percent
    assert 0 < errs["logfmt10"] < errs["logfmt8"] < errs["e4m3"] < 0.1


def test_wrapper_codes_what_crosses_both_ways():
    from moeco.model.moe import Router

    cfg = micro_config()
    torch.manual_seed(2)
    router = Router(cfg)
    torch.nn.init.normal_(router.weight, std=0.1)  # Router allocates with torch.empty
    x = torch.randn(8, cfg.hidden_size)
    routing = router(x)
    codec, e4 = get_codec("logfmt8"), get_codec("e4m3")
    coded = codec.decode(codec.encode(x))
    d = CodecDispatcher(LocalDispatcher(), "logfmt8", "e4m3")
    x_CD, counts, handle = d.dispatch(x, routing, cfg.n_routed_experts)
    ref_CD, _, ref_handle = LocalDispatcher().dispatch(coded, routing, cfg.n_routed_experts)
    assert torch.equal(x_CD, ref_CD)
    y = d.combine(x_CD, handle)
    want = LocalDispatcher().combine(e4.decode(e4.encode(x_CD)), ref_handle)
    assert torch.allclose(y, want)
    assert not torch.allclose(y, LocalDispatcher().combine(x_CD, ref_handle))  # the codec did change it


def test_gradient_is_straight_through():
    model = _model().train()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    apply_codecs(model, "logfmt8", "logfmt8")
    model(ids).logits.float().pow(2).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads if g is not None)
    moe = next(m for _, m in model.moe_layers())
    assert moe.experts.w13_E2FD.grad.abs().sum() > 0 and moe.gate.weight.grad.abs().sum() > 0


def test_train_config_parallel_section():
    cfg = TrainConfig().with_overrides(["parallel.combine_codec=logfmt10", "dispatch_codec=e4m3"])
    assert (cfg.dispatch_codec, cfg.combine_codec) == ("e4m3", "logfmt10")
    assert 'combine_codec = "logfmt10"' in cfg.to_toml() and "[parallel]" in cfg.to_toml()
    assert TrainConfig().combine_codec == "none"
    with pytest.raises(ConfigError, match=r"parallel.combine_codec = 'fp4' is invalid: choose one of"):
        TrainConfig().with_overrides(["parallel.combine_codec=fp4"])


def test_trainer_wraps_every_moe_layer(tmp_path):
    from pydoc_data import topics

    from moeco.train.trainer import Trainer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(topics.topics[n] for n in sorted(topics.topics)[:20]))
    model = dict(hidden_size=48, intermediate_size=96, moe_intermediate_size=24, num_hidden_layers=2,
                 num_attention_heads=2, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                 v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
                 first_k_dense_replace=1, max_position_embeddings=128, vocab_size=384)
    cfg = TrainConfig().with_overrides([f"model.{k}={v}" for k, v in model.items()] + [
        f'data.path="{corpus}"', "data.seq_len=32", "train.batch_size=4", "train.steps=2", "log.eval_batches=1",
        "parallel.dispatch_codec=e4m3", "parallel.combine_codec=logfmt10"])
    trainer = Trainer(cfg, tmp_path / "run", verbose=False)
    try:
        moes = [m for _, m in trainer.model.moe_layers()]
        assert moes and all(isinstance(m.dispatcher, CodecDispatcher) for m in moes)
        assert moes[0].dispatcher.combine_codec.name == "logfmt10"
        summary = trainer.run()
    finally:
        trainer.close()
    assert summary["steps"] == 2 and summary["val_loss"] < 10
