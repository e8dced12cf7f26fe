"""LogFMT-nBit: a sign and a log-spaced magnitude per element, one range per 1x128 tile.

DeepSeek-V3's ISCA'25 paper (section 3.2), base 2 as in DeepEP's LogFMT-10 kernel:

    tile     x (128,), a = |x|;   n bits per element: 1 sign bit, n-1 magnitude bits
    kmax     = 2^(n-1) - 1                      magnitude codes 1..kmax; code 0 is exact zero
    lmax     = log2 max(a)                      max(a) and min(a > 0) travel as BF16 (the metadata)
    lmin     = max(log2 min(a > 0), lmax - 32)  the range clamp: at most 2^32 between min and max
    step     = (lmax - lmin) / (kmax - 1)       code k stands for v_k = 2^(lmin + (k - 1) step)
    encode   k = floor((log2 a - lmin) / step + 2 - log2((1 + 2^step) / 2) / step), clamped to [1, kmax]
             (the threshold between v_(k-1) and v_k is their arithmetic mean: rounding to the nearest
             level in linear space, not in log space, so the error has no systematic sign)
             k = 0 where a < v_1 / 2 (zeros, and values below the clamped range round to zero)
             k = 1 where step = 0 (every non-zero magnitude of the tile is equal)
    decode   x' = sign * v_k,  x' = 0 for k = 0

Wire size per element: n bits plus 2 x 16 bits of metadata per 128 elements; LogFMT-10 is
10.25 bits = 1.28125 bytes, 35.9% below BF16 (DeepEP packs 16 values into five 32-bit words).
In memory the magnitudes sit in uint8/int16 and the signs are packed eight to a byte; `nbytes`
reports the packed wire size.

Differences from DeepEP's kernel, on purpose: the tile minimum is taken over the non-zero
magnitudes (DeepEP counts a zero as the minimum, which sends a tile with one zero to the full 2^32
range), values under the range round to zero or v_1 by the nearest rule, and there is no BF16
fallback for tiles whose max is >= 1 (DeepEP's low-latency combine sends those as BF16).

Bit-exact everywhere: log2 and exp2 are computed here from the float's bits and short polynomials
(float32 additions, multiplications and IEEE divisions only, in a fixed order), because libm's,
numpy's and the GPU's log2/exp2 differ in the last bit. The Triton kernel (`logfmt_triton`) runs the
same operations and matches this reference bit for bit (under the interpreter on CPU; on a GPU
with fused multiply-add turned off). Accuracy of both: ~1e-7 relative, far below any step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moeco.errors import ConfigError

TILE = 128
RANGE_LOG2 = 32.0  # the clamp: lmin >= lmax - 32

# log2(m) = 2/ln2 * atanh(t), t = (m - 1) / (m + 1), m in [sqrt(1/2), sqrt(2)): |t| < 0.172, so the
# series to t^9 leaves < 1e-8.
LOG2_COEF = tuple(2.0 / (k * math.log(2.0)) for k in (1, 3, 5, 7, 9))
# 2^f = sum_k (f ln2)^k / k!, f in [0, 1): terms to k = 9 leave < 3e-9.
EXP2_COEF = tuple(math.log(2.0) ** k / math.factorial(k) for k in range(10))


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 3 <= bits <= 16:
        raise ConfigError(f"LogFMT bits = {bits!r} is invalid: choose an integer from 3 to 16 (e.g. 8 or 10)")
    return bits


def bytes_per_element(bits: int) -> float:
    """Wire bytes per element: n bits plus a BF16 (max, min) pair per 128 elements."""
    return (bits + 32 / TILE) / 8


# ---- exact, portable log2 / exp2 (float32) ---------------------------------------------------
def _f32(v: float, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.float32, device=like.device)


def log2_f32(x: torch.Tensor) -> torch.Tensor:
    """log2 of positive finite float32 x (subnormals included); see the module docstring."""
    tiny = x < 2.0 ** -126
    x = torch.where(tiny, x * _f32(2.0 ** 64, x), x)
    bits = x.view(torch.int32)
    e = ((bits >> 23) & 0xFF) - 127 - torch.where(tiny, 64, 0).to(torch.int32)
    m = ((bits & 0x7FFFFF) | 0x3F800000).view(torch.float32)
    big = m > _f32(1.4142135, x)
    m = torch.where(big, m * _f32(0.5, x), m)
    e = e + big.to(torch.int32)
    one = _f32(1.0, x)
    t = (m - one) / (m + one)
    t2 = t * t
    p = _f32(LOG2_COEF[4], x)
    for c in LOG2_COEF[3::-1]:
        p = p * t2 + _f32(c, x)
    return e.to(torch.float32) + p * t


def exp2_f32(y: torch.Tensor) -> torch.Tensor:
    """2^y for float32 y in about [-190, 128); see the module docstring."""
    i = torch.floor(y)
    f = y - i
    p = _f32(EXP2_COEF[9], y)
    for c in EXP2_COEF[8::-1]:
        p = p * f + _f32(c, y)
    i = i.to(torch.int32)
    i1 = torch.div(i, 2, rounding_mode="floor")
    i2 = i - i1  # two exact power-of-two factors, each a normal float, so results may be subnormal
    s1 = ((i1 + 127) << 23).view(torch.float32)
    s2 = ((i2 + 127) << 23).view(torch.float32)
    return p * s1 * s2


# ---- the payload ---------------------------------------------------------------------------
@dataclass
class LogFMTPayload:
    """What crosses the wire for a (*, D) tensor; T = number of 1x128 tiles (D padded to 128)."""

    magnitudes: torch.Tensor  # (*, Dp) uint8 (n <= 9) or int16: codes 0..kmax
    signs: torch.Tensor  # (*, Dp / 8) uint8, bit b of byte j = sign of element 8j + b
    tile_max: torch.Tensor  # (*, Dp / 128) bfloat16: max |x| of the tile
    tile_min: torch.Tensor  # (*, Dp / 128) bfloat16: min non-zero |x| of the tile (max where none)
    bits: int
    shape: tuple
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes on the wire with the n-bit codes bit-packed: ceil(n * elements / 8) + metadata."""
        return -(-self.magnitudes.numel() * self.bits // 8) + 2 * self.tile_max.numel() * 2

    def log_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(lmin, step) per tile, float32, as encode and decode both compute them."""
        return tile_log_range(self.tile_max.float(), self.tile_min.float(), self.bits)


def tile_log_range(amax: torch.Tensor, amin: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """lmin (clamped) and step from the BF16-valued metadata; 0, 0 for an all-zero tile."""
    nonzero = amax > 0
    safe_max = torch.where(nonzero, amax, _f32(1.0, amax))
    safe_min = torch.where(nonzero, amin, _f32(1.0, amax))
    lmax = log2_f32(safe_max)
    lmin = torch.maximum(log2_f32(safe_min), lmax - _f32(RANGE_LOG2, amax))
    step = (lmax - lmin) / _f32(float(2 ** (bits - 1) - 2), amax)
    zero = _f32(0.0, amax)
    return torch.where(nonzero, lmin, zero), torch.where(nonzero, step, zero)


def _round_bf16(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.bfloat16).float()


def _tiles(x: torch.Tensor) -> torch.Tensor:
    """(*, D) -> (*, Dp / 128, 128) float32, zero-padded."""
    D = x.shape[-1]
    pad = -D % TILE
    xf = x.float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    return xf.reshape(*x.shape[:-1], (D + pad) // TILE, TILE)


def encode_codes(a: torch.Tensor, lmin: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Magnitude codes (int32) of a = |x| (..., 128) for per-tile lmin, step (..., 1)."""
    kmax = 2 ** (bits - 1) - 1
    positive = a > 0
    la = log2_f32(torch.where(positive, a, _f32(1.0, a)))
    has_step = step > 0
    safe_step = torch.where(has_step, step, _f32(1.0, a))
    inv = _f32(1.0, a) / safe_step
    offset = log2_f32((_f32(1.0, a) + exp2_f32(safe_step)) * _f32(0.5, a)) * inv
    kf = torch.floor((la - lmin) * inv + (_f32(2.0, a) - offset))
    k = kf.clamp(1, kmax).to(torch.int32)
    k = torch.where(has_step, k, torch.ones_like(k))
    keep = positive & (la >= lmin - _f32(1.0, a))  # a >= v_1 / 2
    return torch.where(keep, k, torch.zeros_like(k))


def decode_magnitudes(k: torch.Tensor, lmin: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    v = exp2_f32(lmin + step * (k - 1).to(torch.float32))
    return torch.where(k > 0, v, torch.zeros_like(v))


def _sign_weights(device) -> torch.Tensor:
    return torch.tensor([1 << b for b in range(8)], dtype=torch.int32, device=device)


def encode_reference(x: torch.Tensor, bits: int = 8) -> LogFMTPayload:
    """Plain PyTorch LogFMT-n encoding of x (*, D) along the last dim; see the module docstring."""
    check_bits(bits)
    xt = _tiles(x)  # (*, T, 128)
    a = xt.abs()
    amax = _round_bf16(a.amax(dim=-1))
    amin = _round_bf16(torch.where(a > 0, a, torch.full_like(a, float("inf"))).amin(dim=-1))
    amin = torch.where(amax > 0, amin, amax)
    lmin, step = tile_log_range(amax, amin, bits)
    k = encode_codes(a, lmin.unsqueeze(-1), step.unsqueeze(-1), bits)
    neg = (xt < 0).to(torch.int32).reshape(*xt.shape[:-2], -1, 8)
    signs = (neg * _sign_weights(x.device)).sum(dim=-1).to(torch.uint8)
    mag_dtype = torch.uint8 if bits <= 9 else torch.int16
    return LogFMTPayload(k.reshape(*xt.shape[:-2], -1).to(mag_dtype), signs, amax.to(torch.bfloat16),
                         amin.to(torch.bfloat16), bits, tuple(x.shape), x.dtype)


def decode_reference(p: LogFMTPayload) -> torch.Tensor:
    """Plain PyTorch decoding: (*, D) in the encoded tensor's dtype."""
    lmin, step = p.log_range()
    lead = p.magnitudes.shape[:-1]
    k = p.magnitudes.to(torch.int32).reshape(*lead, -1, TILE)
    v = decode_magnitudes(k, lmin.unsqueeze(-1), step.unsqueeze(-1))
    bit = (p.signs.to(torch.int32).unsqueeze(-1) >> torch.arange(8, device=v.device, dtype=torch.int32)) & 1
    v = torch.where(bit.reshape(k.shape) > 0, -v, v)
    return v.reshape(*lead, -1)[..., :p.shape[-1]].to(p.dtype)


# ---- public entry points -------------------------------------------------------------------
