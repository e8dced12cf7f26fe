"""The DeepSeek-V3 model: embed -> N x Block[MLA, dense MLP or MoE] -> norm -> head, plus the MTP chain.

Module names mirror the Hugging Face layout (`model.layers.{i}.self_attn.kv_b_proj`, ...), so a
state dict maps to a checkpoint by one small table in moeco.checkpoint (routed experts and the MTP
layers are the only renames). The model never calls torch.distributed and holds no global state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moeco.config import ModelConfig
from moeco.errors import ConfigError
from moeco.model.layers import MLP, RMSNorm, RotaryEmbedding
from moeco.model.mla import MLA, LatentCache
from moeco.model.moe import GroupedExperts, MoE, Router
from moeco.model.mtp import build_mtp_module, mtp_forward
from moeco.precision import DEFAULT_RECIPE


class Block(nn.Module):
    """Pre-norm decoder layer: x + MLA(norm(x)), then x + FFN(norm(x)) with FFN a dense MLP or the MoE."""

    def __init__(self, config: ModelConfig, layer_id: int, recipe):
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, recipe)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.is_moe_layer(layer_id):
            self.mlp = MoE(config, recipe)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size, recipe)

    def forward(self, x, cos, sin, cache_BTC=None, start_pos=0, absorb=False, return_aux=False):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache_BTC, start_pos, absorb)
        h = self.post_attention_layernorm(x)
        aux = None
        if isinstance(self.mlp, MoE):
            out = self.mlp(h, return_aux=return_aux)
            if return_aux:
                out, aux = out
        else:
            out = self.mlp(h)
        x = x + out
        return (x, aux) if return_aux else x


class Backbone(nn.Module):
    """Holds the HF `model.*` submodules: embed_tokens, layers, norm."""

    def __init__(self, config: ModelConfig, recipe):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i, recipe) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, S, V)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: (B, S-k, V), i predicts i+k+1
    balance_loss: torch.Tensor | None = None  # sum over MoE layers of sum_i f_i P_i (not times alpha)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, recipe=None):
        super().__init__()
        self.config = config
        self.recipe = recipe or DEFAULT_RECIPE
        self.model = Backbone(config, self.recipe)
        self.lm_head = self.recipe.make_linear(config.hidden_size, config.vocab_size, role="head")
        L = config.num_hidden_layers
        self.mtp = nn.ModuleList(build_mtp_module(config, L + k, self.recipe, Block)
                                 for k in range(config.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(config)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    # ---- parameters ---------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """DeepSeek-style init: N(0, initializer_range) for every matrix, ones for norms, zero bias."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, std=std)
                if module.e_score_correction_bias is not None:
                    module.e_score_correction_bias.zero_()
            elif isinstance(module, GroupedExperts):
                nn.init.normal_(module.w13_E2FD, std=std)
                nn.init.normal_(module.w2_EDF, std=std)

    def reset_buffers(self, device=None) -> None:
        """Rebuild non-persistent buffers (after constructing on the meta device and loading weights)."""
        device = device or self.lm_head.weight.device
        self.rotary.inv_freq = RotaryEmbedding(self.config).inv_freq.to(device)
        for _, moe in self.moe_layers():
            moe.gate.tokens_per_expert = torch.zeros(moe.n_experts, dtype=torch.float32, device=device)

    def moe_layers(self):
        """(layer_id, MoE) for every MoE layer, the MTP layers included."""
        for block in list(self.model.layers) + list(self.mtp):
            if isinstance(block.mlp, MoE):
                yield block.layer_id, block.mlp

    def num_params(self, include_mtp: bool = True) -> int:
        skip = set() if include_mtp else {id(p) for p in self.mtp.parameters()}
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)

    # ---- forward ------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, *, cache: LatentCache | None = None, start_pos: int = 0,
                return_mtp: bool = False, return_aux: bool = False,
                attn_impl: str = "auto", last_only: bool = False):
        """Logits (B, S, V); a ModelOutput when MTP logits or the balance term are asked for.

        With a `cache`, the new tokens' latents are written at `start_pos` and attention covers
        the cached prefix. attn_impl: "plain" (materialised K/V), "absorbed" (over the latent
        cache), or "auto" = absorbed when decoding after a prefix, plain otherwise.
        """
        B, S = input_ids.shape
        if start_pos + S > self.config.max_position_embeddings:
            raise ConfigError(f"sequence end {start_pos + S} exceeds max_position_embeddings = "
                              f"{self.config.max_position_embeddings}; shorten the input")
        absorb = {"auto": cache is not None and start_pos > 0, "plain": False, "absorbed": True}[attn_impl]
        positions = torch.arange(start_pos, start_pos + S, device=input_ids.device)
        cos, sin = self.rotary(positions)
        emb = self.model.embed_tokens(input_ids)
        h, balance = emb, []
        for i, layer in enumerate(self.model.layers):
            out = layer(h, cos, sin, None if cache is None else cache.layer(i), start_pos, absorb, return_aux)
            h, aux = out if return_aux else (out, None)
            if aux is not None:
                balance.append(aux)
        if cache is not None:
            cache.length = start_pos + S
        h = self.model.norm(h)
        logits = self.lm_head(h[:, -1:] if last_only else h)
        if not (return_mtp or return_aux):
            return logits

        mtp_logits, prev = [], h
        if return_mtp:
            for k, module in enumerate(self.mtp, start=1):
                n = S - k
                if n <= 0:
                    break
                out = mtp_forward(module, prev[:, :n], emb[:, k:k + n], cos[:n], sin[:n], return_aux)
                prev, aux = out if return_aux else (out, None)
                if aux is not None:
                    balance.append(aux)
                mtp_logits.append(self.lm_head(module.shared_head.norm(prev)))
        balance_loss = torch.stack(balance).sum() if balance else (h.new_zeros(()) if return_aux else None)
        return ModelOutput(logits, mtp_logits, balance_loss)

    # ---- decoding -------------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> LatentCache:
        weight = self.model.embed_tokens.weight
        return LatentCache(self.config, batch, max_len, dtype=dtype or weight.dtype, device=weight.device)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None, vocab_limit: int | None = None) -> torch.Tensor:
        """Prefill with the plain path, then decode token by token with absorbed MLA over the latent cache.

        Returns the prompt followed by the new tokens, (B, P + n); finished rows repeat eos.
        `vocab_limit`: sample only ids below it (a tokenizer smaller than the padded output head).
        """
        from moeco.model.sampling import sample_next

        B, P = input_ids.shape
        if P == 0:
            raise ConfigError("generate needs a non-empty prompt (input_ids has 0 columns)")
        total = P + max_new_tokens
        if total > self.config.max_position_embeddings:
            raise ConfigError(f"prompt {P} + max_new_tokens {max_new_tokens} = {total} exceeds "
                              f"max_position_embeddings = {self.config.max_position_embeddings}")
        was_training = self.training
        self.eval()
        cache = self.new_cache(B, total)
        logits = self(input_ids, cache=cache, start_pos=0, last_only=True)
        tokens, done = [input_ids], torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            last = logits[:, -1].float()
            if vocab_limit is not None and vocab_limit < last.shape[-1]:
                last[:, vocab_limit:] = float("-inf")
            nxt = sample_next(last, temperature, top_p, top_k, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            tokens.append(nxt[:, None])
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            logits = self(nxt[:, None], cache=cache, start_pos=P + step, last_only=True)
        self.train(was_training)
        return torch.cat(tokens, dim=1)

    # ---- checkpoints ------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, **kwargs) -> Path:
        """Write the HF/DeepSeek layout (config.json + safetensors) atomically; see moeco.checkpoint."""
        from moeco.checkpoint import save_pretrained

        return save_pretrained(self, path, **kwargs)
