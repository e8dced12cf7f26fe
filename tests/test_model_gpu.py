"""GPU checks of the model's fast paths (run on the GPU machine with `pytest -m gpu`)."""

import pytest
import torch

import moeco
from helpers import micro_config
from moeco.model.layers import grouped_mm, grouped_mm_reference

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_grouped_mm_matches_reference():
    torch.manual_seed(0)
    x = torch.randn(1000, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(8, 384, 256, device="cuda", dtype=torch.bfloat16) / 16
    counts = torch.tensor([200, 0, 96, 304, 0, 150, 100, 150], device="cuda")
    offs = counts.cumsum(0).to(torch.int32)
    got = grouped_mm(x, w, offs)  # torch._grouped_mm on CUDA
    ref = grouped_mm_reference(x.float(), w.float(), offs)
    cos = torch.nn.functional.cosine_similarity(got.float().flatten(), ref.flatten(), dim=0)
    assert cos > 0.9999


def test_bf16_cuda_model_tracks_fp32_cpu_model_and_absorbed_decode():
    cfg = micro_config(hidden_size=256, moe_intermediate_size=128, intermediate_size=512)
    torch.manual_seed(1)
    ref = moeco.Transformer(cfg).eval()
    gpu = moeco.Transformer(cfg).eval()
    gpu.load_state_dict(ref.state_dict())
    gpu = gpu.to("cuda", torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (2, 64))
    with torch.no_grad():
        want = ref(ids)
        got = gpu(ids.cuda()).float().cpu()
        cache = gpu.new_cache(2, 64)
        steps = [gpu(ids[:, :32].cuda(), cache=cache)]
        for t in range(32, 64):
            steps.append(gpu(ids[:, t:t + 1].cuda(), cache=cache, start_pos=t))
        decoded = torch.cat(steps, 1).float().cpu()
    for out in (got, decoded):
        cos = torch.nn.functional.cosine_similarity(out.flatten(), want.flatten(), dim=0)
        assert cos > 0.995


def test_keep_fp8_on_cuda_matches_the_cpu_emulation(tmp_path):
    """keep_fp8 on CUDA (1x128 FP8 activations, FP8 GEMMs) against the same model on CPU with the
    reference FP8 arithmetic. Against the dequantized BF16 model the logits of this random-weight
    model differ by ~20% (cosine 0.977 on the H200): activation rounding to E4M3 (3 mantissa bits)
    compounds over ~8 GEMMs per layer; that is the recipe, not a fault, hence this comparison."""
    cfg = micro_config(hidden_size=256, moe_intermediate_size=128, intermediate_size=512, q_lora_rank=128)
    torch.manual_seed(2)
    moeco.Transformer(cfg).save_pretrained(tmp_path / "fp8", fp8=True)
    kept = moeco.load_pretrained(tmp_path / "fp8", dtype=torch.bfloat16, device="cuda", keep_fp8=True)
    emul = moeco.load_pretrained(tmp_path / "fp8", dtype=torch.bfloat16, device="cpu", keep_fp8=True)
    for m in emul.modules():
        if hasattr(m, "backend"):
            m.backend = "reference"
    ids = torch.randint(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        a, b = kept(ids.cuda()).float().cpu(), emul(ids).float()
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cos > 0.995, cos
