"""Multi-token prediction (DeepSeek-V3 section 2.2): D sequential modules that keep the causal chain.

Module k (1..D) predicts the token k+1 positions ahead of each input position i:
    h'_i = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(h^{k-1}_i)]      M_k = eh_proj, (D x 2D)
    h^k  = TRM_k(h')  over positions 0 .. S-k-1 (causal)          one full decoder block
    P    = OutHead(RMSNorm(h^k))                                  head shared with the main model
h^0 is the main model's final (normed) hidden state. The paper writes [h ; Emb]; DeepSeek's released
weights (and every engine that loads them) expect the embedding half first, so that is the order here.
The embedding and the output head are the main model's (shared, as in V3's training); checkpoints
also carry copies under the MTP layer's names, which are written on save and ignored on load.
"""

from __future__ import annotations

import torch
from torch import nn

from moeco.config import ModelConfig
from moeco.model.layers import RMSNorm


class SharedHead(nn.Module):
    """Holds only the MTP module's own final norm; the projection is the main model's lm_head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


def build_mtp_module(config: ModelConfig, layer_id: int, recipe, block_cls) -> nn.Module:
    """A decoder block (named like any layer, so checkpoints map 1:1) plus enorm, hnorm, eh_proj, shared_head."""
    block = block_cls(config, layer_id, recipe)
    block.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    block.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
    block.eh_proj = recipe.make_linear(2 * config.hidden_size, config.hidden_size, role="mtp_proj")
    block.shared_head = SharedHead(config)
    return block


def mtp_forward(module: nn.Module, h_BSD: torch.Tensor, next_emb_BSD: torch.Tensor, inp,
                return_aux: bool = False):
    """One MTP depth: combine h^{k-1} with the embedding of the token k ahead, run the block.

    `inp` is the block's AttnInputs (rotary tables, positions, and a cache when drafting).
    """
    x = module.eh_proj(torch.cat([module.enorm(next_emb_BSD), module.hnorm(h_BSD)], dim=-1))
    return module(x, inp, return_aux=return_aux)
