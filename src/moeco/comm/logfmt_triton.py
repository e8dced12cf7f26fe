"""Triton kernels for LogFMT-nBit encode and decode, bit-equal to `moeco.comm.logfmt`'s reference.

One program handles BT tiles of 128 elements: it reads x once, reduces max|x| and min non-zero |x|
per tile, rounds both to BF16 (on the bits, round-to-nearest-even), and writes the magnitude codes,
the packed signs and the two metadata values. Decode reads codes, signs and metadata and writes x'.
The arithmetic is the reference's, operation for operation (log2/exp2 from the float's bits and
the same polynomials, IEEE division via div_rn on a GPU); the GPU launch turns fused multiply-add
off so that every product is rounded as in the reference. Runs on CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import torch

from moeco.comm.logfmt_ref import EXP2_COEF, LOG2_COEF, RANGE_LOG2, TILE, LogFMTPayload, check_bits

try:
    import triton
    import triton.language as tl

    _HAVE_TRITON = True
except ImportError:  # pragma: no cover
    _HAVE_TRITON = False

BT = 8  # tiles per program


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device) -> bool:
    if not _HAVE_TRITON:
        return False
    return torch.device(device).type == "cuda" or interpreting()


if _HAVE_TRITON:

    @triton.jit
    def _div(a, b, IEEE: tl.constexpr):
        if IEEE:
            return tl.math.div_rn(a, b)
        return a / b  # the interpreter divides in numpy float32: IEEE already

    @triton.jit
    def _log2(x, IEEE: tl.constexpr):
        tiny = x < 1.1754943508222875e-38
        x = tl.where(tiny, x * 18446744073709551616.0, x)
        bits = x.to(tl.int32, bitcast=True)
        e = ((bits >> 23) & 0xFF) - 127 - tl.where(tiny, 64, 0)
        m = ((bits & 0x7FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
        big = m > 1.4142135
        m = tl.where(big, m * 0.5, m)
        e = e + big.to(tl.int32)
        t = _div(m - 1.0, m + 1.0, IEEE)
        t2 = t * t
        p = LOG2_C4 * t2 + LOG2_C3
        p = p * t2 + LOG2_C2
        p = p * t2 + LOG2_C1
        p = p * t2 + LOG2_C0
        return e.to(tl.float32) + p * t

    @triton.jit
    def _exp2(y):
        i = tl.floor(y)
        f = y - i
        p = EXP2_C9 * f + EXP2_C8
        p = p * f + EXP2_C7
        p = p * f + EXP2_C6
        p = p * f + EXP2_C5
        p = p * f + EXP2_C4
        p = p * f + EXP2_C3
        p = p * f + EXP2_C2
        p = p * f + EXP2_C1
        p = p * f + EXP2_C0
        ii = i.to(tl.int32)
        i1 = tl.where(ii >= 0, ii // 2, -((1 - ii) // 2))  # floor(i / 2) for either sign
        i2 = ii - i1
        s1 = ((i1 + 127) << 23).to(tl.float32, bitcast=True)
        s2 = ((i2 + 127) << 23).to(tl.float32, bitcast=True)
        return p * s1 * s2

    @triton.jit
    def _round_bf16(v):
        b = v.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536  # round to nearest even on the top 16 bits
        return b.to(tl.float32, bitcast=True)

    @triton.jit
    def _log_range(amax, amin, KSTEPS: tl.constexpr, IEEE: tl.constexpr):
        nonzero = amax > 0
        lmax = _log2(tl.where(nonzero, amax, 1.0), IEEE)
        lmin = tl.maximum(_log2(tl.where(nonzero, amin, 1.0), IEEE), lmax - RANGE)
        step = _div(lmax - lmin, lmax * 0.0 + KSTEPS, IEEE)
        return tl.where(nonzero, lmin, 0.0), tl.where(nonzero, step, 0.0)

    @triton.jit
    def _encode_kernel(x_ptr, mag_ptr, sign_ptr, max_ptr, min_ptr, n_tiles, KMAX: tl.constexpr,
                       KSTEPS: tl.constexpr, IEEE: tl.constexpr, BT: tl.constexpr, TILE: tl.constexpr,
                       BF16_BITS: tl.constexpr):
        tiles = tl.program_id(0) * BT + tl.arange(0, BT)
        cols = tl.arange(0, TILE)
        ok = tiles < n_tiles
        offs = tiles[:, None] * TILE + cols[None, :]
        if BF16_BITS:  # bf16 given as int16 bits: widen on the bits (exact for subnormals too)
            xb = tl.load(x_ptr + offs, mask=ok[:, None], other=0).to(tl.int32)
            x = ((xb & 0xFFFF) << 16).to(tl.float32, bitcast=True)
        else:
            x = tl.load(x_ptr + offs, mask=ok[:, None], other=0.0).to(tl.float32)
        a = tl.abs(x)
        amax = _round_bf16(tl.max(a, axis=1))
        amin = _round_bf16(tl.min(tl.where(a > 0, a, float("inf")), axis=1))
        amin = tl.where(amax > 0, amin, amax)
        lmin, step = _log_range(amax, amin, KSTEPS, IEEE)
        lmin = lmin[:, None]
        step = step[:, None]
        positive = a > 0
        la = _log2(tl.where(positive, a, 1.0), IEEE)
        has_step = step > 0
        safe_step = tl.where(has_step, step, 1.0)
        inv = _div(safe_step * 0.0 + 1.0, safe_step, IEEE)
        offset = _log2((1.0 + _exp2(safe_step)) * 0.5, IEEE) * inv
        kf = tl.floor((la - lmin) * inv + (2.0 - offset))
        kf = tl.minimum(tl.maximum(kf, 1.0), KMAX)
        k = tl.where(has_step, kf.to(tl.int32), 1)
        k = tl.where(positive & (la >= lmin - 1.0), k, 0)
        tl.store(mag_ptr + offs, k.to(mag_ptr.dtype.element_ty), mask=ok[:, None])
        neg = (x < 0).to(tl.int32)
        weights = 1 << (cols % 8)
        packed = tl.sum(tl.reshape(neg * weights[None, :], (BT, TILE // 8, 8)), axis=2)
        tl.store(sign_ptr + tiles[:, None] * (TILE // 8) + tl.arange(0, TILE // 8)[None, :],
                 packed.to(tl.uint8), mask=ok[:, None])
        tl.store(max_ptr + tiles, amax, mask=ok)
        tl.store(min_ptr + tiles, amin, mask=ok)

    @triton.jit
    def _decode_kernel(mag_ptr, sign_ptr, max_ptr, min_ptr, out_ptr, n_tiles, KSTEPS: tl.constexpr,
                       IEEE: tl.constexpr, BT: tl.constexpr, TILE: tl.constexpr):
        tiles = tl.program_id(0) * BT + tl.arange(0, BT)
        cols = tl.arange(0, TILE)
        ok = tiles < n_tiles
        offs = tiles[:, None] * TILE + cols[None, :]
        k = tl.load(mag_ptr + offs, mask=ok[:, None], other=0).to(tl.int32)
        amax = tl.load(max_ptr + tiles, mask=ok, other=0.0)
        amin = tl.load(min_ptr + tiles, mask=ok, other=0.0)
        lmin, step = _log_range(amax, amin, KSTEPS, IEEE)
        v = _exp2(lmin[:, None] + step[:, None] * (k - 1).to(tl.float32))
        v = tl.where(k > 0, v, 0.0)
        byte = tl.load(sign_ptr + tiles[:, None] * (TILE // 8) + cols[None, :] // 8, mask=ok[:, None], other=0)
        neg = (byte.to(tl.int32) >> (cols[None, :] % 8)) & 1
        tl.store(out_ptr + offs, tl.where(neg > 0, -v, v), mask=ok[:, None])

    # Polynomial coefficients as compile-time globals (float32 constants inside the kernels).
    LOG2_C0, LOG2_C1, LOG2_C2, LOG2_C3, LOG2_C4 = (tl.constexpr(c) for c in LOG2_COEF)
    (EXP2_C0, EXP2_C1, EXP2_C2, EXP2_C3, EXP2_C4, EXP2_C5, EXP2_C6, EXP2_C7, EXP2_C8,
     EXP2_C9) = (tl.constexpr(c) for c in EXP2_COEF)
    RANGE = tl.constexpr(RANGE_LOG2)


def _launch_opts(device) -> dict:
    return {} if interpreting() else {"enable_fp_fusion": False}


def encode(x: torch.Tensor, bits: int) -> LogFMTPayload:
    check_bits(bits)
    D = x.shape[-1]
    pad = -D % TILE
    x2 = x.reshape(-1, D)
    if pad:
        x2 = torch.nn.functional.pad(x2, (0, pad))
    x2 = x2.contiguous()
    bf16_bits = x2.dtype == torch.bfloat16
    if not bf16_bits and x2.dtype != torch.float32:
        x2 = x2.float()
    n_tiles = x2.numel() // TILE
    lead = x.shape[:-1]
    Dp = D + pad
    mag = torch.empty(x2.shape, dtype=torch.uint8 if bits <= 9 else torch.int16, device=x.device)
    signs = torch.empty(x2.shape[0], Dp // 8, dtype=torch.uint8, device=x.device)
    tmax = torch.empty(n_tiles, dtype=torch.float32, device=x.device)
    tmin = torch.empty_like(tmax)
    if n_tiles:
        _encode_kernel[(triton.cdiv(n_tiles, BT),)](
            x2.view(torch.int16) if bf16_bits else x2, mag, signs, tmax, tmin, n_tiles,
            KMAX=2 ** (bits - 1) - 1, KSTEPS=float(2 ** (bits - 1) - 2),
            IEEE=not interpreting(), BT=BT, TILE=TILE, BF16_BITS=bf16_bits,
            **_launch_opts(x.device))
    return LogFMTPayload(mag.reshape(*lead, Dp), signs.reshape(*lead, Dp // 8),
                         tmax.to(torch.bfloat16).reshape(*lead, Dp // TILE),
                         tmin.to(torch.bfloat16).reshape(*lead, Dp // TILE), bits, tuple(x.shape), x.dtype)


def decode(p: LogFMTPayload) -> torch.Tensor:
    mag = p.magnitudes.contiguous()
    n_tiles = mag.numel() // TILE
    out = torch.empty(mag.shape, dtype=torch.float32, device=mag.device)
    if n_tiles:
        _decode_kernel[(triton.cdiv(n_tiles, BT),)](
            mag, p.signs.contiguous(), p.tile_max.float().contiguous(), p.tile_min.float().contiguous(), out,
            n_tiles, KSTEPS=float(2 ** (p.bits - 1) - 2), IEEE=not interpreting(), BT=BT, TILE=TILE,
            **_launch_opts(mag.device))
    return out[..., :p.shape[-1]].to(p.dtype)
