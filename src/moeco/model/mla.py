"""Multi-head Latent Attention (DeepSeek-V2/V3), with its two equivalent computations.

Notation (per token t, head h): x_t in R^D; d_c = kv_lora_rank; dn = qk_nope_head_dim;
dr = qk_rope_head_dim; dv = v_head_dim.

    c_t   = RMSNorm(W_DKV x_t)                 (d_c,)     the latent: the only thing cached,
    kr_t  = RoPE(W_KR x_t)                     (dr,)      together with this shared rotary key
    q_t,h = [W_UQ c^Q_t ; RoPE(W_QR c^Q_t)]    (dn + dr,) c^Q_t = RMSNorm(W_DQ x_t), or W_Q x_t directly
    k_t,h = [W_UK,h c_t ; kr_t]                (dn + dr,)
    v_t,h = W_UV,h c_t                          (dv,)
    o_t,h = sum_j softmax_j(q_t,h . k_j,h * scale) v_j,h ;  u_t = W_O [o_t,1; ...; o_t,H]

Plain path (training, prefill): materialise k and v for every head from the latents and run causal
attention. Absorbed path (decode): since q . k = (W_UK,h^T q^C)_h . c_j + q^R . kr_j, fold W_UK into
the query once per step and attend over the cached latents directly; likewise
o_t,h = W_UV,h (sum_j p_j c_j), so W_UV is applied after the weighted sum. Per token the cache then
holds d_c + dr values per layer instead of H * (dn + dr + dv): 576 vs 49,152 for DeepSeek-V3.

In checkpoints W_DKV and W_KR are one matrix (`kv_a_proj_with_mqa`, output [c ; kr]) and W_UK, W_UV
are one (`kv_b_proj`, output per head [k^C ; v]); names follow the HF layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeco.config import ModelConfig
from moeco.model.layers import RMSNorm, apply_rope_interleaved


class LatentCache:
    """Per-sequence MLA cache: for every layer, [c_t ; kr_t] of kv_lora_rank + qk_rope_head_dim values.

    `latent` is one (L, B, T_max, d_c + dr) tensor; `length` counts the tokens written so far.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, *, num_layers: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        self.kv_lora_rank = config.kv_lora_rank
        layers = config.num_hidden_layers if num_layers is None else num_layers
        self.latent = torch.zeros(layers, batch, max_len, config.latent_dim, dtype=dtype, device=device)
        self.length = 0

    def layer(self, layer_id: int) -> torch.Tensor:
        return self.latent[layer_id]

    def bytes_per_token(self) -> int:
        """Bytes one token occupies across all layers (equals ModelConfig.kv_cache_bytes_per_token)."""
        layers, _, _, dim = self.latent.shape
        return layers * dim * self.latent.element_size()




class MLA(nn.Module):
    def __init__(self, config: ModelConfig, recipe):
        super().__init__()
        c = config
        self.n_heads, self.kv_lora_rank = c.num_attention_heads, c.kv_lora_rank
        self.dn, self.dr, self.dv = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.q_lora_rank = c.q_lora_rank
        self.scale = c.softmax_scale()
        qk = self.dn + self.dr
        role = "attn_proj"
        if c.q_lora_rank is None:
            self.q_proj = recipe.make_linear(c.hidden_size, self.n_heads * qk, role=role)
        else:
            self.q_a_proj = recipe.make_linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias, role=role)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = recipe.make_linear(c.q_lora_rank, self.n_heads * qk, role=role)
        self.kv_a_proj_with_mqa = recipe.make_linear(c.hidden_size, c.latent_dim, bias=c.attention_bias, role=role)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = recipe.make_linear(c.kv_lora_rank, self.n_heads * (self.dn + self.dv), role=role)
        self.o_proj = recipe.make_linear(self.n_heads * self.dv, c.hidden_size, bias=c.attention_bias, role=role)
        self._kv_b_dense = None  # (key, weight): kv_b_proj dequantized once, when it is stored in FP8

    def kv_b_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W_UK and W_UV as one dense (H*(dn+dv), d_c) matrix for the absorbed path.

        A plain Linear's weight is used as it is; an FP8 one (`dequantized_weight()`, keep_fp8
        inference) is dequantized once and reused while its stored weight is unchanged, not at
        every decode step of every layer.
        """
        lin = self.kv_b_proj
        dequantize = getattr(lin, "dequantized_weight", None)
        if dequantize is None:
            return lin.weight.to(dtype)
        key = (lin.weight.data_ptr(), lin.weight._version, dtype)
        if self._kv_b_dense is None or self._kv_b_dense[0] != key:
            self._kv_b_dense = (key, dequantize(dtype))
        return self._kv_b_dense[1]

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache_BTC: torch.Tensor | None = None, start_pos: int = 0, absorb: bool = False) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x_BSD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        q_nope, q_rot = q.view(B, S, self.n_heads, self.dn + self.dr).split([self.dn, self.dr], dim=-1)
        q_rot = apply_rope_interleaved(q_rot, cos, sin)

        latent, k_rot = self.kv_a_proj_with_mqa(x_BSD).split([self.kv_lora_rank, self.dr], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_rot = apply_rope_interleaved(k_rot, cos, sin)  # (B, S, dr), shared by all heads

        if cache_BTC is not None:
            end = start_pos + S
            cache_BTC[:B, start_pos:end, : self.kv_lora_rank] = latent
            cache_BTC[:B, start_pos:end, self.kv_lora_rank:] = k_rot
            latent, k_rot = cache_BTC[:B, :end, : self.kv_lora_rank], cache_BTC[:B, :end, self.kv_lora_rank:]
            latent, k_rot = latent.to(x_BSD.dtype), k_rot.to(x_BSD.dtype)
        attend = self._absorbed if absorb else self._plain
        o_BSHV = attend(q_nope, q_rot, latent, k_rot, start_pos)
        return self.o_proj(o_BSHV.flatten(2))

    @staticmethod
    def _mask(S: int, T: int, start_pos: int, device) -> torch.Tensor | None:
        """Boolean (S, T) mask, True where query i (position start_pos+i) may see key j; None if all may."""
        if S == 1:
            return None
        q_pos = torch.arange(S, device=device)[:, None] + start_pos
        return torch.arange(T, device=device)[None, :] <= q_pos

    def _plain(self, q_nope, q_rot, latent_BTC, k_rot_BTR, start_pos):
        B, S, H, _ = q_nope.shape
        T = latent_BTC.shape[1]
        kv = self.kv_b_proj(latent_BTC).view(B, T, H, self.dn + self.dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        k = torch.cat([k_nope, k_rot_BTR[:, :, None, :].expand(B, T, H, self.dr)], dim=-1)
        q = torch.cat([q_nope, q_rot], dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S|T, .)
        if S == T and start_pos == 0:
            # q/k (96 wide in `small`) and v (64) differ, which rules out the flash kernel; on the
            # H200 SDPA then takes cuDNN's, faster than flash over a zero-padded v
            # (bench/attention_gpu.py: 272 vs 231 TFLOP/s fwd+bwd).
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(S, T, start_pos, q.device),
                                               scale=self.scale)
        return o.transpose(1, 2)  # (B, S, H, dv)

    def _absorbed(self, q_nope, q_rot, latent_BTC, k_rot_BTR, start_pos):
        S, T = q_nope.shape[1], latent_BTC.shape[1]
        w = self.kv_b_weight(q_nope.dtype).view(self.n_heads, self.dn + self.dv, self.kv_lora_rank)
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn:]
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # W_UK folded into the query
        scores = (torch.einsum("bshc,btc->bsht", q_latent, latent_BTC)
                  + torch.einsum("bshr,btr->bsht", q_rot, k_rot_BTR)) * self.scale
        mask = self._mask(S, T, start_pos, scores.device)
        if mask is not None:
            scores = scores.masked_fill(~mask[None, :, None, :], float("-inf"))
        probs = scores.float().softmax(dim=-1).to(q_nope.dtype)
        o_latent = torch.einsum("bsht,btc->bshc", probs, latent_BTC)
        return torch.einsum("bshc,hdc->bshd", o_latent, w_uv)  # W_UV applied after the weighted sum
