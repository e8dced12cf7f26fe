"""Quantize / dequantize: E4M3 bounds, scale shapes, padding of partial tiles, scale formats."""

import pytest
import torch

from moeco.fp8.quantize import (
    FP8_MAX,
    dequantize_act_1x128,
    dequantize_weight_128x128,
    e4m3_bounds_ok,
    expand_weight_scale,
    quantize_act_1x128,
    quantize_act_1x128_t,
    quantize_weight_128x128,
)


def _inputs(kind: str, shape, gen):
    if kind == "normal":
        return torch.randn(shape, generator=gen)
    if kind == "outliers":  # heavy tails: a few channels 1000x larger, as in LLM activations
        x = torch.randn(shape, generator=gen)
        mask = torch.rand(shape, generator=gen) < 0.01
        return torch.where(mask, x * 1000, x)
    if kind == "tiny":
        return torch.randn(shape, generator=gen) * 1e-6
    return torch.zeros(shape)


@pytest.mark.parametrize("kind", ["normal", "outliers", "tiny", "zeros"])
@pytest.mark.parametrize("shape", [(4, 256), (3, 5, 300), (1, 7)])
@pytest.mark.parametrize("pow2", [False, True])
def test_act_round_trip_within_e4m3_bounds(kind, shape, pow2):
    gen = torch.Generator().manual_seed(hash((kind, shape, pow2)) % 2**31)
    x = _inputs(kind, shape, gen)
    q, s = quantize_act_1x128(x, pow2_scale=pow2)
    kb = -(-shape[-1] // 128)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == torch.float32 and s.shape == (*shape[:-1], kb)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert q.float().abs().max() <= FP8_MAX
    s_full = s.repeat_interleave(128, -1)[..., : shape[-1]]
    assert e4m3_bounds_ok(x, q, s_full).all()
    xd = dequantize_act_1x128(q, s)
    if kind == "zeros":
        assert (xd == 0).all()
    else:  # relative to each tile's amax: half an E4M3 ulp at the top of the range, 2^-4
        amax = x.abs().reshape(-1, shape[-1]).amax(-1).clamp(min=1e-4)
        err = (xd - x).abs().reshape(-1, shape[-1]).amax(-1)
        assert (err <= amax * 2.0**-4 * (2 if pow2 else 1)).all()


def test_act_scale_is_amax_over_448_and_pow2_rounds_up():
    x = torch.randn(8, 384)
    _, s = quantize_act_1x128(x)
    amax = x.view(8, 3, 128).abs().amax(-1)
    # correctly rounded: float64 division then one rounding (innocuous double rounding for a quotient)
    torch.testing.assert_close(s, (amax.double() / 448).float(), rtol=0, atol=0)
    _, s2 = quantize_act_1x128(x, pow2_scale=True)
    assert (torch.log2(s2) == torch.log2(s2).round()).all()
    assert (s2 >= s).all() and (s2 < 2 * s).all()
    # the tile amax reaches the top of the E4M3 range (exactly 448 with fp32 scales)
    q, _ = quantize_act_1x128(x)
    assert (q.float().view(8, 3, 128).abs().amax(-1) == 448).all()


def test_zero_tile_gets_floor_scale():
    q, s = quantize_act_1x128(torch.zeros(2, 128))
    assert torch.allclose(s, torch.full_like(s, 1e-4 / 448)) and (q.float() == 0).all()


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (7, 129), (3, 130, 260)])
@pytest.mark.parametrize("kind", ["normal", "outliers", "zeros"])
def test_weight_round_trip_and_scale_shape(shape, kind):
    gen = torch.Generator().manual_seed(sum(shape))
    w = _inputs(kind, shape, gen)
    q, s = quantize_weight_128x128(w)
    *lead, N, K = shape
    assert q.shape == w.shape and q.dtype == torch.float8_e4m3fn
    assert s.shape == (*lead, -(-N // 128), -(-K // 128))
    s_full = expand_weight_scale(s, N, K)
    assert e4m3_bounds_ok(w, q, s_full).all()
    wd = dequantize_weight_128x128(q, s, torch.float32)
    assert ((wd - w).abs() <= s_full * 448 * 2.0**-4).all()
    # zero padding: the partial last block's scale is the amax of its real entries only
    if kind == "normal" and not lead:
        last = w[(s.shape[0] - 1) * 128:, (s.shape[1] - 1) * 128:]
        assert s[-1, -1] == last.abs().max().clamp(min=1e-4) / 448


def test_weight_scale_is_deepseek_weight_scale_inv():
    """A checkpoint pair (fp8 weight, weight_scale_inv) dequantizes as w = q * scale per block."""
    q = (torch.randn(256, 128) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale_inv = torch.tensor([[0.5], [0.25]])
    w = dequantize_weight_128x128(q, scale_inv, torch.bfloat16)
    assert w.dtype == torch.bfloat16
    torch.testing.assert_close(w[:128].float(), (q[:128].float() * 0.5).bfloat16().float())
    torch.testing.assert_close(w[128:].float(), (q[128:].float() * 0.25).bfloat16().float())
    with pytest.raises(ValueError, match="one scale per 128x128 block"):
        dequantize_weight_128x128(q, torch.ones(2, 2))


def test_quantize_along_tokens_matches_transpose():
    x = torch.randn(300, 200)
    q, s = quantize_act_1x128_t(x)
    q2, s2 = quantize_act_1x128(x.t().contiguous())
    assert q.shape == (200, 300) and s.shape == (200, 3)
    assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8)) and torch.equal(s, s2)
    xq, xs = quantize_act_1x128(x)  # re-tiling from FP8: dequantize then quantize along T
    q3, s3 = quantize_act_1x128_t(xq, xs)
    q4, s4 = quantize_act_1x128(dequantize_act_1x128(xq, xs).t().contiguous())
    assert torch.equal(q3.view(torch.uint8), q4.view(torch.uint8)) and torch.equal(s3, s4)


def test_quantize_along_tokens_through_a_row_map_on_cpu():
    """rows[t] picks output token t's source row (-1: zeros), from high precision and from FP8."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(150, 40, generator=gen)
    rows = torch.full((300,), -1, dtype=torch.int32)
    rows[3:53] = torch.arange(0, 50, dtype=torch.int32)
    rows[128:228] = torch.arange(50, 150, dtype=torch.int32)
    padded = torch.zeros(300, 40)
    padded[rows >= 0] = x[rows[rows >= 0].long()]
    q, s = quantize_act_1x128_t(x, rows=rows)
    q_ref, s_ref = quantize_act_1x128(padded.t().contiguous())
    assert q.shape == (40, 300) and torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    xq, xs = quantize_act_1x128(x)
    padded[rows >= 0] = dequantize_act_1x128(xq, xs)[rows[rows >= 0].long()]
    q, s = quantize_act_1x128_t(xq, xs, rows=rows)
    q_ref, s_ref = quantize_act_1x128(padded.t().contiguous())
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_token_wise_backend_choice():
    """The recipe's quant_kernel picks the token-wise kernel on CUDA; a bad value is a one-line error
    naming it; CPU tensors never go to the NVRTC kernel."""
    from moeco.errors import ConfigError
    from moeco.fp8 import Fp8Recipe, cuda_kernels

    with pytest.raises(ConfigError, match="Fp8Recipe.quant_kernel='fast'; valid: auto, cuda, triton"):
        Fp8Recipe(quant_kernel="fast")
    assert Fp8Recipe(quant_kernel="cuda").kernels.quant == "cuda"
    assert not cuda_kernels.token_wise_supported(torch.randn(256, 64, dtype=torch.bfloat16), None)
    x = torch.randn(256, 64)
    q, s = quantize_act_1x128_t(x, quant_kernel="cuda")  # CPU: the reference, whatever the recipe says
    assert q.shape == (64, 256) and s.shape == (64, 2)
    q_ref, s_ref = quantize_act_1x128_t(x)
    assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))


def test_torch_e4m3_cast_rounds_to_nearest_even():
    """The CPU reference quantizer is only as exact as torch's float32 -> E4M3 cast: check it against
    integer round-to-nearest-even on every 61st float32 in [2^-12, 464), which covers each binade's
    mantissa patterns (ties included), plus the ties between subnormals (multiples of 2^-9) and the
    saturation at 448. (It holds for all 174.6M positive float32 values of that range; the CUDA cast was
    checked against the CUDA kernels, tests/test_fp8_gpu.py.)"""
    lo = torch.tensor(2.0**-12).view(torch.int32).item()
    hi = torch.tensor(464.0).view(torch.int32).item()
    a = torch.arange(lo, hi, 61, dtype=torch.int32).view(torch.float32)  # 61 is odd: every low-bit pattern
    ties = torch.arange(1, 32, 2, dtype=torch.float32) * 2.0**-10  # halfway between two subnormals
    a = torch.cat([a, ties])
    bits = a.view(torch.int32)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & ~0xFFFFF).view(torch.float32)
    sub = (a.double() * 512).round().div(512).float()  # float64 round() is half-to-even, exact here
    want = torch.where(a < 2**-6, sub, normal).clamp(max=448.0)
    assert torch.equal(a.to(torch.float8_e4m3fn).float(), want)
    assert torch.equal((-a).to(torch.float8_e4m3fn).float(), -want)
