"""Small building blocks: RMSNorm, rotary embedding with YaRN, the SwiGLU MLP, and the Linear factory.

Shape legend: B batch, S sequence, D hidden, H heads, R rotary dims (qk_rope_head_dim),
E routed experts, F expert hidden size, T tokens (B*S flattened), K reduction dim, N output dim.

Rotary layout. DeepSeek checkpoints rotate *interleaved* pairs (x0, x1), (x2, x3), ... of the R
rotary dims, each pair by one frequency theta_j = base^(-2j/R) (HF: `rope_interleave=True`; a
checkpoint stored half-split, `rope_interleave=False`, is reordered on load and save, see moeco.checkpoint):
    (x_{2j} + i x_{2j+1}) * exp(i * pos * theta_j) * attention_factor
YaRN (long-context extension) changes theta_j per dimension between interpolation (theta/factor)
and extrapolation (theta) with a linear ramp over the correction range set by beta_fast/beta_slow,
and scales cos/sin by attention_factor = mscale(factor, mscale) / mscale(factor, mscale_all_dim);
the softmax scale gets mscale(factor, mscale_all_dim)^2 (see ModelConfig.softmax_scale).

Precision is chosen at build time: the model asks a recipe (`moeco.precision`) for every Linear it
builds (`recipe.make_linear(in, out, bias=..., role=...)`), as MLP does here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moeco.config import ModelConfig, yarn_mscale
from moeco.precision import Recipe


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, output in the input's dtype (as DeepSeek's and HF's)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) in float32 (one fused kernel where PyTorch has one), rounded to
        # x's dtype, then scaled by the weight in that dtype (under autocast too: a bf16 input
        # gives a bf16 output, not a float32 one through type promotion with the fp32 weight).
        dtype = x.dtype
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(dtype)
        return self.weight.to(dtype) * normed


# ---- rotary embedding ---------------------------------------------------------------------
def rope_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (R/2,) and the cos/sin attention factor, YaRN-corrected when configured."""
    dim, base = config.qk_rope_head_dim, float(config.rope_theta)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if config.rope_type != "yarn":
        return inv_freq, 1.0
    rs = config.rope_scaling
    factor = float(rs["factor"])
    orig = rs["original_max_position_embeddings"]
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    if rs.get("attention_factor") is not None:
        attention_factor = float(rs["attention_factor"])
    elif mscale and mscale_all_dim:
        attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:  # dimension index that turns `rotations` times in `orig`
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    inv_freq = (inv_freq / factor) * (1 - extrapolate) + inv_freq * extrapolate
    return inv_freq, attention_factor


class RotaryEmbedding(nn.Module):
    """Produces cos/sin tables (..., R/2) for positions of any shape; holds no learned state.

    inv_freq stays float32 whatever dtype the model is cast to: in bf16 it is 0.37% off, and the
    angles pos * theta drift with position (routing decisions flip a few thousand tokens in).
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(config)
        self._inv_freq_exact = inv_freq  # a plain attribute: Module.to() leaves it alone
        self.register_buffer("inv_freq", inv_freq.clone(), persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:  # restore, not upcast: the cast already rounded
            self.inv_freq = self._inv_freq_exact.to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[..., None] * self.inv_freq.float()
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of the last dim of x (B, S, [H,] R) by cos/sin of shape ([B,] S, R/2).

    cos/sin broadcast over heads, and over batch when they are per position only.
    """
    if x.dim() == 4:
        cos, sin = cos[..., None, :], sin[..., None, :]
    dtype = x.dtype
    x = x.float()
    x_even, x_odd = x[..., 0::2], x[..., 1::2]
    out = torch.stack((x_even * cos - x_odd * sin, x_odd * cos + x_even * sin), dim=-1)
    return out.flatten(-2).to(dtype)


# ---- MLP ------------------------------------------------------------------------------------
class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int, recipe: Recipe, role: str = "mlp"):
        super().__init__()
        self.gate_proj = recipe.make_linear(dim, hidden, role=role)
        self.up_proj = recipe.make_linear(dim, hidden, role=role)
        self.down_proj = recipe.make_linear(hidden, dim, role=role)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
