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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeco.config import ModelConfig
from moeco.model.cache import CacheLayer, LatentCache, visible
from moeco.model.layers import RMSNorm, apply_rope_interleaved


@dataclass
class AttnInputs:
    """What every layer's attention needs for one forward, built once by the Transformer.

    positions None means the plain training case: every row holds positions 0..S-1 and there is
    no cache, so attention is causal over the S new tokens (SDPA's is_causal kernel).
    """

    cos: torch.Tensor  # (S, R/2) or (B, S, R/2)
    sin: torch.Tensor
    positions: torch.Tensor | None = None  # (B, S) per-token positions; negative = padding
    cache: LatentCache | None = None
    absorb: bool = False  # attend over the latents with W_UK / W_UV folded (decode), or materialise K, V


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
        inference) is dequantized once and reused while its stored tensors are unchanged, not at
        every decode step of every layer. The key covers every tensor the dequantization reads
        (the FP8 weight and its block scales): where each lives and its in-place version counter.
        """
        lin = self.kv_b_proj
        dequantize = getattr(lin, "dequantized_weight", None)
        if dequantize is None:
            return lin.weight.to(dtype)
        stored = [*lin.parameters(recurse=False), *lin.buffers(recurse=False)]
        key = (tuple((t.data_ptr(), t._version) for t in stored), dtype)
        if self._kv_b_dense is None or self._kv_b_dense[0] != key:
            self._kv_b_dense = (key, dequantize(dtype))
        return self._kv_b_dense[1]

    def forward(self, x_BSD: torch.Tensor, inp: AttnInputs, cache: CacheLayer | None = None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x_BSD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BSD)))
        q_nope, q_rot = q.view(B, S, self.n_heads, self.dn + self.dr).split([self.dn, self.dr], dim=-1)
        q_rot = apply_rope_interleaved(q_rot, inp.cos, inp.sin)

        latent, k_rot = self.kv_a_proj_with_mqa(x_BSD).split([self.kv_lora_rank, self.dr], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_rot = apply_rope_interleaved(k_rot, inp.cos, inp.sin)  # (B, S, dr), shared by all heads

        mask = None  # None: causal over the S new tokens
        if cache is not None:
            cache.write(torch.cat([latent, k_rot], dim=-1), inp.positions)
            kernel = getattr(cache, "attend_absorbed", None) if inp.absorb else None
            if kernel is not None:  # the cache's own kernel over its layout (paged decode)
                q_latent = torch.einsum("bshd,hdc->bshc", q_nope, self._w_uk_uv(q_nope.dtype)[0])
                o_latent = kernel(q_latent, q_rot, inp.positions, self.scale)
                o = torch.einsum("bshc,hdc->bshd", o_latent.to(q_nope.dtype), self._w_uk_uv(q_nope.dtype)[1])
                return self.o_proj(o.flatten(2))
            rows, key_pos = cache.read()
            latent, k_rot = rows.to(x_BSD.dtype).split([self.kv_lora_rank, self.dr], dim=-1)
            mask = visible(inp.positions, key_pos)
        elif inp.positions is not None:
            mask = visible(inp.positions, inp.positions)
        attend = self._absorbed if inp.absorb else self._plain
        o_BSHV = attend(q_nope, q_rot, latent, k_rot, mask)
        return self.o_proj(o_BSHV.flatten(2))

    def _w_uk_uv(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """W_UK (H, dn, d_c) and W_UV (H, dv, d_c), views of kv_b_proj's weight."""
        w = self.kv_b_weight(dtype).view(self.n_heads, self.dn + self.dv, self.kv_lora_rank)
        return w[:, : self.dn], w[:, self.dn:]

    def _plain(self, q_nope, q_rot, latent_BTC, k_rot_BTR, mask_BST):
        B, S, H, _ = q_nope.shape
        T = latent_BTC.shape[1]
        kv = self.kv_b_proj(latent_BTC).view(B, T, H, self.dn + self.dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        k = torch.cat([k_nope, k_rot_BTR[:, :, None, :].expand(B, T, H, self.dr)], dim=-1)
        q = torch.cat([q_nope, q_rot], dim=-1)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, S|T, .)
        if mask_BST is None:
            # q/k (96 wide in `small`) and v (64) differ, which rules out the flash kernel; on the
            # H200 SDPA then takes cuDNN's, faster than flash over a zero-padded v
            # (bench/attention_gpu.py: 272 vs 231 TFLOP/s fwd+bwd).
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_BST[:, None], scale=self.scale)
        return o.transpose(1, 2)  # (B, S, H, dv)

    def _absorbed(self, q_nope, q_rot, latent_BTC, k_rot_BTR, mask_BST):
        S, T = q_nope.shape[1], latent_BTC.shape[1]
        w_uk, w_uv = self._w_uk_uv(q_nope.dtype)
        q_latent = torch.einsum("bshd,hdc->bshc", q_nope, w_uk)  # W_UK folded into the query
        scores = (torch.einsum("bshc,btc->bsht", q_latent, latent_BTC)
                  + torch.einsum("bshr,btr->bsht", q_rot, k_rot_BTR)) * self.scale
        if mask_BST is None and S > 1:
            mask_BST = torch.ones(S, T, dtype=torch.bool, device=scores.device).tril()[None]
        if mask_BST is not None:
            scores = scores.masked_fill(~mask_BST[:, :, None, :], float("-inf"))
        probs = scores.float().softmax(dim=-1).to(q_nope.dtype)
        o_latent = torch.einsum("bsht,btc->bshc", probs, latent_BTC)
        return torch.einsum("bshc,hdc->bshd", o_latent, w_uv)  # W_UV applied after the weighted sum
