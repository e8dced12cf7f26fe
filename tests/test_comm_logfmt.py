"""LogFMT-nBit (moeco.comm.logfmt) and the wire codecs: the format's definition, its Triton kernel
(under the interpreter on CPU) against the reference bit for bit, and the error ordering the format's
arithmetic predicts."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the kernels' import

from moeco.comm import get_codec, logfmt, roundtrip  # noqa: E402
from moeco.errors import ConfigError  # noqa: E402
from moeco.fp8.quantize import dequantize_act_1x128, quantize_act_1x128  # noqa: E402


def _rel(codec, x):
    y = codec.decode(codec.encode(x)).float()
    return ((y - x.float()).norm() / x.float().norm()).item()


def _log_uniform(gen, rows, span, dtype=torch.bfloat16):
    mag = torch.exp2(-torch.rand(rows, 128, generator=gen) * span)
    return (mag * torch.randn(rows, 128, generator=gen).sign()).to(dtype)


@pytest.mark.parametrize("bits", [8, 10])
def test_tile_min_and_max_round_trip_exactly_and_zero_stays_zero(bits):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(16, 256, generator=gen) * 0.3).bfloat16()
    x[:, ::7] = 0
    x[3, 5] = -0.0
    y = logfmt.decode(logfmt.encode(x, bits))
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    a = x.float().abs().view(16, 2, 128)
    amax = a.amax(-1, keepdim=True)
    amin = torch.where(a > 0, a, torch.inf).amin(-1, keepdim=True)
    yv = y.float().view(16, 2, 128)
    assert torch.equal(yv.abs()[a == amax], a[a == amax])
    assert torch.equal(yv.abs()[a == amin], a[a == amin])
    assert torch.equal(y.float().sign(), x.float().sign())
    assert (y[x == 0] == 0).all()
    assert (logfmt.decode(logfmt.encode(torch.zeros(2, 128), bits)) == 0).all()


@pytest.mark.parametrize("bits", [5, 8, 10])
def test_code_count_per_sign(bits):
    """Magnitude codes 1..2^(n-1)-1, each a distinct level from min to max; code 0 is zero."""
    kmax = 2 ** (bits - 1) - 1
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(64, 128, generator=gen) * 0.9 + 0.1
    x[:, 0], x[:, 1] = 1.0, 0.1  # every tile: the same max and min, so the same levels
    p = logfmt.encode(x, bits)
    assert int(p.magnitudes.min()) >= 1 and int(p.magnitudes.max()) == kmax
    levels = torch.arange(1, kmax + 1, dtype=torch.int32).view(1, -1)
    lmin, step = p.log_range()
    v = logfmt.decode_magnitudes(levels, lmin[:1, :1], step[:1, :1])[0]
    assert v.numel() == kmax and (v.diff() > 0).all()
    assert v[0].item() == pytest.approx(0.1, rel=1e-3) and v[-1].item() == pytest.approx(1.0, rel=1e-6)
    assert p.magnitudes.dtype == (torch.uint8 if bits <= 9 else torch.int16)


@pytest.mark.parametrize("bits", [5, 6])
def test_linear_space_rounding_is_unbiased(bits):
    """Nearest level in linear space: mean error ~0 on a locally flat density, where rounding in log
    space (thresholds at the geometric mean) is biased upward."""
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(4096, 128, generator=gen) * 0.75 + 0.25
    p = logfmt.encode(x, bits)
    y = logfmt.decode(p)
    lmin, step = (t.unsqueeze(-1) for t in p.log_range())
    k = torch.round((x.view(4096, 1, 128).log2() - lmin) / step) + 1
    y_log = torch.exp2(lmin + step * (k - 1)).view_as(x)
    bias_lin = ((y - x).mean() / x.mean()).item()
    bias_log = ((y_log - x).mean() / x.mean()).item()
    assert bias_log > 5e-5
    assert abs(bias_lin) < bias_log / 5


def test_range_clamp():
    x = torch.zeros(1, 128)
    x[0, 0], x[0, 1], x[0, 2], x[0, 3] = 1.0, 2.0 ** -40, 2.0 ** -31, 2.0 ** -20
    p = logfmt.encode(x, 10)
    lmin, step = p.log_range()
    assert lmin.item() == pytest.approx(-32.0, abs=1e-5)  # max - log2(2^32), not log2(2^-40)
    assert p.tile_min.float().item() == 2.0 ** -40  # the metadata keeps the true min; the clamp is computed
    y = logfmt.decode(p)
    assert y[0, 1] == 0  # below the range: zero
    assert y[0, 2].item() == pytest.approx(2.0 ** -31, rel=0.05)
    assert y[0, 3].item() == pytest.approx(2.0 ** -20, rel=0.05)
    assert y[0, 0] == 1.0


@pytest.mark.parametrize("bits,dtype", [(8, torch.bfloat16), (10, torch.bfloat16), (10, torch.float32),
                                        (4, torch.float32)])
def test_triton_equals_reference_bit_for_bit(bits, dtype):
    from moeco.comm import logfmt_triton

    if not logfmt_triton.available(torch.device("cpu")) and not torch.cuda.is_available():
        pytest.skip("Triton interpreter not available")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, 300, generator=gen) * torch.exp2(torch.randint(-20, 4, (10, 1), generator=gen).float())
    x[0, :9] = 0
    x[1, 128:256] = 0  # an all-zero tile
    x[2, 7] = 2.0 ** -45  # under the clamp
    x[4, :128] = 0.375  # one magnitude: step 0
    x[5, 3] = 1e-40  # a float32 subnormal
    _assert_triton_equals_reference(x.to(dtype).to(dev), bits)


def _assert_triton_equals_reference(x, bits):
    ref, tri = logfmt.encode(x, bits, impl="reference"), logfmt.encode(x, bits, impl="triton")
    for name in ("magnitudes", "signs"):
        assert torch.equal(getattr(ref, name), getattr(tri, name)), name
    for name in ("tile_max", "tile_min"):
        assert torch.equal(getattr(ref, name).view(torch.int16), getattr(tri, name).view(torch.int16)), name
    a, b = logfmt.decode(ref, impl="reference"), logfmt.decode(ref, impl="triton")
    assert torch.equal(a.float().view(torch.int32), b.float().view(torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 10])
def test_triton_equals_reference_on_cuda_at_deepseek_v3_width(bits):
    """The compiled kernel (not the interpreter) on a dispatch-sized tensor: 4096 tokens x 7168, rows
    spread over 2^-30..2^10 so tiles of every range, the clamp included, occur."""
    from moeco.comm import logfmt_triton

    if not torch.cuda.is_available() or not logfmt_triton.available(torch.device("cuda")):
        pytest.skip("needs CUDA and Triton")
    gen = torch.Generator(device="cuda").manual_seed(11)
    scale = torch.exp2(torch.randint(-30, 10, (4096, 56, 1), device="cuda", generator=gen).float())
    x = (torch.randn(4096, 56, 128, device="cuda", generator=gen) * scale).view(4096, 7168).bfloat16()
    x[:, ::97] = 0
    _assert_triton_equals_reference(x, bits)


def test_error_ordering_follows_the_format_arithmetic():
    """Moderate tile range: LogFMT-10 < LogFMT-8 < E4M3. LogFMT-8's step is range/126 octaves, E4M3's
    ~1/8: past a range of ~2^16 E4M3 wins."""
    gen = torch.Generator().manual_seed(4)
    e4m3, l8, l10 = get_codec("e4m3"), get_codec("logfmt8"), get_codec("logfmt10")
    for span in (4, 8):
        x = _log_uniform(gen, 512, span)
        assert _rel(l10, x) < _rel(l8, x) < 0.7 * _rel(e4m3, x)
    x = (torch.randn(512, 128, generator=gen)).bfloat16()
    assert _rel(l10, x) < _rel(l8, x) < _rel(e4m3, x)
    for span in (24, 28):
        x = _log_uniform(gen, 512, span)
        assert _rel(l8, x) > 1.2 * _rel(e4m3, x)
        assert _rel(l10, x) < _rel(e4m3, x)


def test_bytes_per_element_and_payload_sizes():
    assert logfmt.bytes_per_element(10) == 1.28125  # 36% below BF16
    assert 1 - logfmt.bytes_per_element(10) / 2 == pytest.approx(0.359, abs=1e-3)
    x = torch.randn(32, 1024).bfloat16()
    for name, bpe in (("bf16", 2.0), ("e4m3", 1.03125), ("e5m2", 1.03125), ("logfmt8", 1.03125),
                      ("logfmt10", 1.28125)):
        c = get_codec(name)
        assert c.bytes_per_element == bpe
        assert c.encode(x).nbytes == bpe * x.numel()


def test_codecs():
    gen = torch.Generator().manual_seed(5)
    xb = torch.randn(8, 256, generator=gen).bfloat16()
    assert torch.equal(get_codec("bf16").decode(get_codec("bf16").encode(xb)), xb)
    x = torch.randn(8, 256, generator=gen)
    q, s = quantize_act_1x128(x)
    assert torch.equal(get_codec("e4m3").decode(get_codec("e4m3").encode(x)), dequantize_act_1x128(q, s))
    y = get_codec("e5m2").decode(get_codec("e5m2").encode(x))
    assert y.dtype == x.dtype and 0.02 < ((y - x).norm() / x.norm()).item() < 0.1  # 2 mantissa bits
    assert get_codec("none") is None and get_codec(None) is None
    assert get_codec("LogFMT-10").bits == 10
    for bad in ("fp4", "logfmt2", "logfmt17"):
        with pytest.raises(ConfigError, match="parallel.combine_codec = .* choose one of"):
            get_codec(bad, "parallel.combine_codec")
    with pytest.raises(ConfigError, match="bits"):
        logfmt.encode(x, 1)


def test_roundtrip_is_straight_through():
    x = torch.randn(4, 128, requires_grad=True)
    g = torch.randn(4, 128)
    y = roundtrip(get_codec("logfmt8"), x)
    assert not torch.equal(y, x)
    y.backward(g)
    assert torch.equal(x.grad, g)
