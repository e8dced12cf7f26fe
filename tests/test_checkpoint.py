"""Checkpoint layout, FP8 release format, MTP kept, and loud, all-or-nothing failures."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import moeco
from moeco.generate import generate
from helpers import micro_config


@pytest.fixture()
def model():
    torch.manual_seed(9)
    m = moeco.Transformer(micro_config()).eval()
    for _, moe in m.moe_layers():
        moe.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    return m


def _ids(cfg):
    return torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))


def test_round_trip_keeps_mtp_and_bias(model, tmp_path):
    model.save_pretrained(tmp_path / "ck")
    keys = set(safe_open(str(tmp_path / "ck/model.safetensors"), "pt").keys())
    L = model.config.num_hidden_layers
    assert f"model.layers.{L}.eh_proj.weight" in keys and f"model.layers.{L}.shared_head.norm.weight" in keys
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys  # DeepSeek's per-expert names
    loaded = moeco.load_pretrained(tmp_path / "ck")
    ids = _ids(model.config)
    with torch.no_grad():
        a, b = model(ids, return_mtp=True), loaded(ids, return_mtp=True)
    torch.testing.assert_close(b.logits, a.logits, atol=0, rtol=0)
    torch.testing.assert_close(b.mtp_logits[0], a.mtp_logits[0], atol=0, rtol=0)
    for (_, m1), (_, m2) in zip(model.moe_layers(), loaded.moe_layers()):
        assert torch.equal(m1.gate.e_score_correction_bias, m2.gate.e_score_correction_bias)


def test_sharded_checkpoint(model, tmp_path):
    model.save_pretrained(tmp_path / "ck", max_shard_bytes=200_000)
    index = json.loads((tmp_path / "ck/model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    loaded = moeco.load_pretrained(tmp_path / "ck")
    ids = _ids(model.config)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_fused_expert_layout_loads(model, tmp_path):
    model.save_pretrained(tmp_path / "ck")
    tensors = load_file(str(tmp_path / "ck/model.safetensors"))
    E = model.config.n_routed_experts
    for layer in range(model.config.num_hidden_layers + 1):
        prefix = f"model.layers.{layer}.mlp.experts"
        if f"{prefix}.0.gate_proj.weight" not in tensors:
            continue
        gate = torch.stack([tensors.pop(f"{prefix}.{j}.gate_proj.weight") for j in range(E)])
        up = torch.stack([tensors.pop(f"{prefix}.{j}.up_proj.weight") for j in range(E)])
        tensors[f"{prefix}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        tensors[f"{prefix}.down_proj"] = torch.stack([tensors.pop(f"{prefix}.{j}.down_proj.weight") for j in range(E)])
    save_file(tensors, str(tmp_path / "ck/model.safetensors"))
    loaded = moeco.load_pretrained(tmp_path / "ck")
    ids = _ids(model.config)
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_fp8_checkpoint_with_partial_blocks_loads_close(tmp_path):
    # hidden 160 and the 96-wide latent make partial 128x128 edge blocks
    cfg = micro_config(hidden_size=160, q_lora_rank=96, intermediate_size=200, moe_intermediate_size=72)
    torch.manual_seed(10)
    model = moeco.Transformer(cfg).eval()
    model.save_pretrained(tmp_path / "fp8", fp8=True)
    f = safe_open(str(tmp_path / "fp8/model.safetensors"), "pt")
    w = f.get_tensor("model.layers.0.mlp.gate_proj.weight")
    s = f.get_tensor("model.layers.0.mlp.gate_proj.weight_scale_inv")
    assert w.dtype == torch.float8_e4m3fn and s.shape == (2, 2)  # 200x160 -> 2x2 blocks
    assert json.loads((tmp_path / "fp8/config.json").read_text())["quantization_config"]["weight_block_size"] == [128, 128]
    loaded = moeco.load_pretrained(tmp_path / "fp8", dtype=torch.float32)
    # expected: the original model with every FP8-eligible matrix passed through E4M3 128x128 blocks
    import moeco.checkpoint as ckpt
    from moeco.fp8.quantize import dequantize_weight_128x128, quantize_weight_128x128

    expected = moeco.load_pretrained(tmp_path / "fp8", dtype=torch.float32)
    expected.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, p in expected.named_parameters():
            if p.dim() == 2 and name.split(".")[-2] in ckpt._FP8_MODULES:
                p.copy_(dequantize_weight_128x128(*quantize_weight_128x128(p)))
            elif ".experts.w" in name:  # routed experts ship per expert and per matrix, each in its own blocks
                for w in p:
                    for m in (w.chunk(2) if name.endswith("w13_E2FD") else (w,)):
                        m.copy_(dequantize_weight_128x128(*quantize_weight_128x128(m)))
    ids = _ids(cfg)
    with torch.no_grad():
        ref, got, want = model(ids).logits, loaded(ids).logits, expected(ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # E4M3 keeps 3 mantissa bits: close to the original, but visibly not equal
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert 0.9 < cos < 1.0


def _corrupt(tmp_path, model, edit):
    model.save_pretrained(tmp_path / "ck")
    tensors = load_file(str(tmp_path / "ck/model.safetensors"))
    edit(tensors)
    save_file(tensors, str(tmp_path / "ck/model.safetensors"))
    return tmp_path / "ck"


def test_missing_tensor_is_named(model, tmp_path):
    path = _corrupt(tmp_path, model, lambda t: t.pop("model.layers.2.self_attn.kv_b_proj.weight"))
    with pytest.raises(moeco.LoadError, match=r"missing tensor 'model\.layers\.2\.self_attn\.kv_b_proj\.weight'"):
        moeco.load_pretrained(path)


def test_missing_expert_is_named(model, tmp_path):
    path = _corrupt(tmp_path, model, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    with pytest.raises(moeco.LoadError, match=r"experts\.3\.up_proj"):
        moeco.load_pretrained(path)


def test_unexpected_and_misshaped_tensors_are_named(model, tmp_path):
    def add(t):
        t["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    with pytest.raises(moeco.LoadError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.extra\.weight'"):
        moeco.load_pretrained(_corrupt(tmp_path / "a", model, add))

    def reshape(t):
        t["model.norm.weight"] = torch.ones(7)
    with pytest.raises(moeco.LoadError, match=r"'model\.norm\.weight' has shape \(7,\)"):
        moeco.load_pretrained(_corrupt(tmp_path / "b", model, reshape))


def test_partial_mtp_layer_is_an_error_not_a_silent_drop(model, tmp_path):
    L = model.config.num_hidden_layers
    path = _corrupt(tmp_path, model, lambda t: t.pop(f"model.layers.{L}.eh_proj.weight"))
    with pytest.raises(moeco.LoadError, match="eh_proj"):
        moeco.load_pretrained(path)


def test_save_is_atomic_and_never_clobbers_other_directories(model, tmp_path, monkeypatch):
    model.save_pretrained(tmp_path / "ck")
    before = (tmp_path / "ck/model.safetensors").read_bytes()
    import moeco.checkpoint as ckpt

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(ckpt, "save_file", boom)
    with pytest.raises(RuntimeError):
        model.save_pretrained(tmp_path / "ck")
    assert (tmp_path / "ck/model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary left behind
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/todo.txt").write_text("mine")
    with pytest.raises(moeco.LoadError, match="refusing to overwrite"):
        model.save_pretrained(tmp_path / "notes")


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(moeco.LoadError, match="no config.json"):
        moeco.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(micro_config().to_hf_dict()))
    with pytest.raises(moeco.LoadError, match="no \\*.safetensors"):
        moeco.load_pretrained(tmp_path)


def test_keep_fp8_holds_the_release_weights_in_fp8_and_matches_the_dequantized_model(tmp_path):
    cfg = micro_config(hidden_size=160, q_lora_rank=96, intermediate_size=200, moe_intermediate_size=72)
    torch.manual_seed(13)
    moeco.Transformer(cfg).save_pretrained(tmp_path / "fp8", fp8=True)
    deq = moeco.load_pretrained(tmp_path / "fp8", dtype=torch.bfloat16)
    kept = moeco.load_pretrained(tmp_path / "fp8", dtype=torch.bfloat16, keep_fp8=True)
    from moeco.fp8.inference import Fp8InferenceExperts, fp8_weight_bytes
    from moeco.fp8.linear import Fp8InferenceLinear

    assert isinstance(kept.model.layers[0].self_attn.kv_b_proj, Fp8InferenceLinear)
    assert isinstance(kept.model.layers[1].mlp.experts, Fp8InferenceExperts)
    assert kept.model.layers[1].mlp.experts.w1_EFD.dtype == torch.float8_e4m3fn
    # every FP8-shipped projection is one byte per weight: the projections take half of BF16's memory
    fp8_bytes, _ = fp8_weight_bytes(kept)
    import moeco.checkpoint as ckpt

    proj_bytes_bf16 = sum(p.numel() * 2 for n, p in deq.named_parameters()
                          if (p.dim() == 2 and n.split(".")[-2] in ckpt._FP8_MODULES) or ".experts.w" in n)
    assert fp8_bytes * 2 == proj_bytes_bf16
    ids = _ids(cfg)
    with torch.no_grad():  # on CPU the kept weights are dequantized on use: the same model exactly
        torch.testing.assert_close(kept(ids.clone()).logits.float(), deq(ids.clone()).logits.float(), atol=2e-2, rtol=0)
        assert generate(kept, ids[:1, :4], 6).tolist() == generate(deq, ids[:1, :4], 6).tolist()
    # and a kept-FP8 model saves back to the same release layout
    kept.save_pretrained(tmp_path / "again")
    a = load_file(str(tmp_path / "fp8/model.safetensors"))
    b = load_file(str(tmp_path / "again/model.safetensors"))
    assert set(a) == set(b)
    assert all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a if a[k].dtype == torch.float8_e4m3fn)


def test_keep_fp8_needs_an_fp8_checkpoint(model, tmp_path):
    model.save_pretrained(tmp_path / "ck")
    with pytest.raises(moeco.LoadError, match="no FP8 weights"):
        moeco.load_pretrained(tmp_path / "ck", keep_fp8=True)


def test_keep_fp8_decode_dequantizes_kv_b_once(tmp_path, monkeypatch):
    cfg = micro_config()
    torch.manual_seed(14)
    moeco.Transformer(cfg).save_pretrained(tmp_path / "fp8", fp8=True)
    kept = moeco.load_pretrained(tmp_path / "fp8", keep_fp8=True)
    from moeco.fp8.linear import Fp8InferenceLinear

    calls = []
    original = Fp8InferenceLinear.dequantized_weight
    monkeypatch.setattr(Fp8InferenceLinear, "dequantized_weight",
                        lambda self, dtype=torch.float32: calls.append(id(self)) or original(self, dtype))
    kv_b = [id(layer.self_attn.kv_b_proj) for layer in kept.model.layers]
    for new_tokens in (8, 16):
        calls.clear()
        generate(kept, _ids(cfg)[:1, :4], new_tokens)
        # the plain prefill's forward dequantizes once per layer; the absorbed decode steps reuse
        # one cached dense copy (built on the first generate), whatever the number of steps
        assert [calls.count(k) for k in kv_b] == [2 if new_tokens == 8 else 1] * len(kv_b)
