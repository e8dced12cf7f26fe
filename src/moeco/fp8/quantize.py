"""Fine-grained E4M3 quantization: 1x128 activation tiles and 128x128 weight blocks.

Notation (DeepSeek-V3 tech report, section 3.3):

    x_TK   activations, T tokens x K channels; one scale per token per 128 channels (1x128 tile)
    w_NK   a Linear weight, N outputs x K inputs; one scale per 128x128 block
    q      the E4M3 values (torch.float8_e4m3fn, finite, max 448)
    s      float32 scales, "scale_inv" in DeepSeek's checkpoints:  x ~= q * s  tile by tile

For every tile or block:

    amax = max(|x|) over the tile, clamped to >= 1e-4    (an all-zero tile still gets a finite scale)
    s    = amax / 448, correctly rounded                 (or 2^ceil(log2(amax / 448)): "ue8m0")
    q    = e4m3(x / s)                                   (round to nearest even; |x / s| <= 448)

A dimension that is not a multiple of 128 is zero-padded up to the next multiple before the amax
is taken, so the last tile or block is partial but scaled like the others; the padding is dropped
again from `q`. Scale shapes: act (*lead, ceil(K/128)), weight (*lead, ceil(N/128), ceil(K/128)).
The weight scale is exactly the `weight_scale_inv` tensor of DeepSeek-V3's FP8 checkpoints.

These functions are the plain PyTorch definition. On CUDA, `quantize_act_1x128`,
`quantize_act_1x128_t` and `quantize_weight_128x128` dispatch to fused Triton kernels
(`moeco.fp8.triton_kernels`) when Triton is present; the tests check that the two agree bit for bit
(under the Triton interpreter on CPU, and on the H200).
"""

from __future__ import annotations

import torch

from moeco.errors import ConfigError
from moeco.fp8 import cuda_kernels, triton_kernels
from moeco.fp8.format import AMAX_FLOOR, BLOCK, FP8_DTYPE, FP8_MAX
from moeco.fp8.format import ceil_div as _ceil_div


def _scale_from_amax(amax: torch.Tensor, pow2_scale: bool) -> torch.Tensor:
    a = amax.float().clamp(min=AMAX_FLOOR)
    # A tensor divisor, not the Python float: PyTorch's CUDA kernel divides by a scalar as a
    # multiplication by its reciprocal (one ulp off in about half the cases), so `a / 448.0` is not
    # the same function on CPU and GPU. Tensor by tensor is an IEEE division on both, as the Triton
    # kernels' `div_rn`.
    scale = a / torch.full_like(a, FP8_MAX)
    if pow2_scale:
        # ue8m0: a power of two rounded up (so x / s still fits under 448), exactly, on the bits.
        bits = scale.contiguous().view(torch.int32)
        scale = ((bits + 0x7FFFFF) & 0x7F800000).view(torch.float32)
    return scale


def _pad_last(x: torch.Tensor, dim: int, multiple: int = BLOCK) -> torch.Tensor:
    size = x.shape[dim]
    pad = _ceil_div(size, multiple) * multiple - size
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def quantize_act_1x128_reference(x: torch.Tensor, *, pow2_scale: bool = False):
    """Plain PyTorch 1x128 quantization; see the module docstring."""
    K = x.shape[-1]
    lead = x.shape[:-1]
    kb = _ceil_div(K, BLOCK)
    xp = _pad_last(x, -1).reshape(*lead, kb, BLOCK).float()
    scale = _scale_from_amax(xp.abs().amax(dim=-1), pow2_scale)  # (*lead, kb)
    q = (xp / scale.unsqueeze(-1)).to(FP8_DTYPE)
    q = q.reshape(*lead, kb * BLOCK)[..., :K]
    return q.contiguous(), scale


def quantize_act_1x128(x: torch.Tensor, *, pow2_scale: bool = False):
    """Quantize `x` (*, K) to E4M3 with one float32 scale per 1x128 tile along the last dim.

    Returns (q, scale): q has x's shape in float8_e4m3fn, scale is (*, ceil(K/128)) float32,
    and x ~= q * scale tile by tile.
    """
    if x.is_cuda and x.dim() >= 1 and x.numel() > 0:
        if triton_kernels.available():
            return triton_kernels.quantize_act_1x128(x, pow2_scale=pow2_scale)
    return quantize_act_1x128_reference(x, pow2_scale=pow2_scale)


def quantize_act_1x128_t(x: torch.Tensor, x_scale: torch.Tensor | None = None, *, pow2_scale: bool = False,
                         rows: torch.Tensor | None = None, quant_kernel: str = "auto"):
    """Quantize x (T, C) along T, i.e. x.t() per 1x128 tile: returns q (C, T) and s (C, ceil(T/128)).

    This is the 128x1 tiling of Wgrad, whose two operands are both scaled along the token dim.
    With `x_scale`, x is already FP8 with 1x128 scales along C (the activations saved by the
    forward pass) and is dequantized first: the 1x128 -> 128x1 re-tiling of the report.
    With `rows` (T',) integer, output token t is x's row rows[t], or a zero row where rows[t] < 0
    (the grouped Wgrad's per-expert padding): q (C, T').
    On CUDA: the NVRTC kernel of `moeco.fp8.cuda_kernels` where it applies, else Triton's;
    `quant_kernel` (the recipe's field): "auto", "cuda" (required) or "triton".
    """
    if x.is_cuda:
        if quant_kernel != "triton" and cuda_kernels.token_wise_supported(x, x_scale):
            out = cuda_kernels.token_wise(x, x_scale, pow2_scale=pow2_scale, rows=rows)
            if out is not None:
                return out
        if quant_kernel == "cuda":
            raise ConfigError(
                f"quant_kernel='cuda', but the NVRTC kernel cannot take this input "
                f"({x.dtype}, shape {tuple(x.shape)}) here: {cuda_kernels.status()}; use quant_kernel='auto'")
        if triton_kernels.available():
            return triton_kernels.quantize_act_1x128_t(x, x_scale, pow2_scale=pow2_scale, rows=rows)
    xf = x.float() if x_scale is None else dequantize_act_1x128(x, x_scale)
    if rows is not None:
        rows = rows.long()
        ok = (rows >= 0).unsqueeze(1)
        xf = torch.where(ok, xf[rows.clamp(min=0)], xf.new_zeros(()))
    return quantize_act_1x128_reference(xf.t(), pow2_scale=pow2_scale)


def quantize_act_1x128_dual(x: torch.Tensor, *, pow2_scale: bool = False, quant_kernel: str = "auto"):
    """Both tilings of x (T, C): `(quantize_act_1x128(x), quantize_act_1x128_t(x))`, the same bits.

    Backward needs both for the output gradient (Dgrad takes its 1x128 tiles, Wgrad its 128x1 tiles):
    on CUDA, for bf16 / fp16 input, one NVRTC kernel reads x once and writes both (the fused cast and
    transpose DeepSeek-V3's report asks hardware for); elsewhere (or with quant_kernel="triton") the
    two functions run in turn.
    """
    if x.is_cuda and quant_kernel != "triton" and cuda_kernels.dual_supported(x):
        out = cuda_kernels.dual(x, pow2_scale=pow2_scale)
        if out is not None:
            return out
    return (quantize_act_1x128(x, pow2_scale=pow2_scale),
            quantize_act_1x128_t(x, pow2_scale=pow2_scale, quant_kernel=quant_kernel))


def dequantize_act_1x128(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32):
    """Inverse of `quantize_act_1x128`: q (*, K), scale (*, ceil(K/128)) -> (*, K) in `dtype`."""
    K = q.shape[-1]
    s = scale.float().repeat_interleave(BLOCK, dim=-1)[..., :K]
    return (q.float() * s).to(dtype)


def quantize_weight_128x128(w: torch.Tensor, *, pow2_scale: bool = False, transposed: bool = False):
    """Quantize `w` (*, N, K) to E4M3 with one float32 scale per 128x128 block.

    Returns (q, scale): q has w's shape in float8_e4m3fn, scale is (*, ceil(N/128), ceil(K/128))
    float32 (DeepSeek's `weight_scale_inv`), and w ~= q * scale block by block. Leading dims
    (e.g. experts E) are independent matrices. With `transposed=True` also q_t (*, K, N), q with
    its last two dims swapped and contiguous: the Dgrad operand, whose 128x128 scales are
    scale.transpose(-1, -2) (on CUDA the same kernel writes it).
    """
    if w.dim() < 2:
        raise ValueError(f"quantize_weight_128x128 needs a (*, N, K) tensor, got shape {tuple(w.shape)}")
    if w.is_cuda and w.numel() > 0:  # one Triton kernel, bit-exact (tests/test_fp8_gpu.py on the H200)
        if triton_kernels.available():
            return triton_kernels.quantize_weight_128x128(w, pow2_scale=pow2_scale, transposed=transposed)
    q, scale = quantize_weight_128x128_reference(w, pow2_scale=pow2_scale)
    return (q, scale, q.transpose(-1, -2).contiguous()) if transposed else (q, scale)


def quantize_weight_128x128_reference(w: torch.Tensor, *, pow2_scale: bool = False):
    """Plain PyTorch 128x128 block quantization; see `quantize_weight_128x128`."""
    *lead, N, K = w.shape
    nb, kb = _ceil_div(N, BLOCK), _ceil_div(K, BLOCK)
    wp = _pad_last(_pad_last(w, -1), -2).float().reshape(*lead, nb, BLOCK, kb, BLOCK)
    scale = _scale_from_amax(wp.abs().amax(dim=(-3, -1)), pow2_scale)  # (*lead, nb, kb)
    q = (wp / scale[..., :, None, :, None]).to(FP8_DTYPE)
    q = q.reshape(*lead, nb * BLOCK, kb * BLOCK)[..., :N, :K]
    return q.contiguous(), scale


def expand_weight_scale(scale: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """(*, ceil(N/128), ceil(K/128)) block scales -> (*, N, K) elementwise scales."""
    s = scale.float().repeat_interleave(BLOCK, dim=-2).repeat_interleave(BLOCK, dim=-1)
    return s[..., :N, :K]


def dequantize_weight_128x128(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32):
    """Inverse of `quantize_weight_128x128`; also loads DeepSeek's (weight, weight_scale_inv) pairs."""
    *lead, N, K = q.shape
    want = (*lead, _ceil_div(N, BLOCK), _ceil_div(K, BLOCK))
    if tuple(scale.shape) != want:
        raise ValueError(
            f"weight scale has shape {tuple(scale.shape)}, expected {want} for a weight of shape "
            f"{tuple(q.shape)} (one scale per 128x128 block)"
        )
    return (q.float() * expand_weight_scale(scale, N, K)).to(dtype)


def e4m3_bounds_ok(x: torch.Tensor, q: torch.Tensor, scale_full: torch.Tensor) -> torch.Tensor:
    """|x - q*s| <= half an E4M3 ulp of x/s, times s (the round-to-nearest bound), elementwise.

    E4M3 has 3 mantissa bits: spacing 2^(e-3) for |v| in [2^e, 2^(e+1)), e >= -6; subnormals below
    2^-6 are spaced 2^-9. Used by the tests; kept here because it documents the format.
    """
    v = (x.float() / scale_full).abs()
    e = torch.floor(torch.log2(v.clamp(min=2.0**-6)))
    half_ulp = torch.exp2(e - 3) / 2
    err = (x.float() - q.float() * scale_full).abs()
    return err <= half_ulp * scale_full * (1 + 1e-6) + 1e-30


__all__ = [
    "AMAX_FLOOR", "BLOCK", "FP8_DTYPE", "FP8_MAX", "dequantize_act_1x128", "dequantize_weight_128x128",
    "expand_weight_scale", "quantize_act_1x128", "quantize_act_1x128_reference", "quantize_act_1x128_t",
    "quantize_weight_128x128", "quantize_weight_128x128_reference",
]
