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
from moeco.model.cache import DenseLatentCache, LatentCache
from moeco.model.layers import MLP, RMSNorm, RotaryEmbedding
from moeco.model.mla import MLA, AttnInputs
from moeco.model.moe import GroupedExperts, MoE, Router, mix_seed
from moeco.model.mtp import build_mtp_module, mtp_forward
from moeco.precision import DEFAULT_RECIPE


class Block(nn.Module):
    """Pre-norm decoder layer: x + MLA(norm(x)), then x + FFN(norm(x)) with FFN a dense MLP or the MoE.

    The two halves are separate stages (`attention`, `ffn`) so that a scheduler can interleave two
    micro-batches, one's attention running while the other's experts communicate.
    """

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

    def attention(self, x: torch.Tensor, inp: AttnInputs) -> torch.Tensor:
        cache = None if inp.cache is None else inp.cache.layer(self.layer_id)
        return x + self.self_attn(self.input_layernorm(x), inp, cache)

    def ffn(self, x: torch.Tensor, return_aux: bool = False):
        """x + FFN(norm(x)); with return_aux, also the MoE's balance term (None for a dense layer)."""
        h = self.post_attention_layernorm(x)
        aux = None
        if isinstance(self.mlp, MoE):
            out = self.mlp(h, return_aux=return_aux)
            if return_aux:
                out, aux = out
        else:
            out = self.mlp(h)
        return (x + out, aux) if return_aux else x + out

    def forward(self, x: torch.Tensor, inp: AttnInputs, return_aux: bool = False):
        return self.ffn(self.attention(x, inp), return_aux)


class Backbone(nn.Module):
    """Holds the HF `model.*` submodules: embed_tokens, layers, norm."""

    def __init__(self, config: ModelConfig, recipe):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i, recipe) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, S, V), or (B, 1, V) with last_only
    hidden: torch.Tensor  # (B, S, D) final normed hidden state h^0 (what the MTP modules and the head read)
    mtp_logits: list[torch.Tensor] = field(default_factory=list)  # depth k: (B, S-k, V), i predicts i+k+1
    balance_loss: torch.Tensor | None = None  # sum over MoE layers of sum_i f_i P_i (not times alpha)


def _draw_seed() -> int:
    return int(torch.randint(0, 2 ** 62, (1,), device="cpu").item())


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, recipe=None):
        super().__init__()
        # reset_parameters' seed, drawn before any submodule's own init consumes the RNG, so the weights
        # depend only on the RNG state at construction. Built on meta (loading, or sharding before the
        # draw) nothing consumes the RNG: reset_parameters draws it then, from the same state.
        self.init_seed = None if torch.empty(0).device.type == "meta" else _draw_seed()
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
        """DeepSeek-style init: N(0, initializer_range) for every matrix, ones for norms, zero bias.

        Each matrix draws from its own generator seeded by (init_seed, its module's index), routed
        experts one generator per expert: the values do not depend on the order or the device the
        modules were built on, and an expert-parallel rank's experts equal the whole layer's slice."""
        std = self.config.initializer_range
        if self.init_seed is None:
            self.init_seed = _draw_seed()

        def gen(i, t):
            return torch.Generator(device=t.device).manual_seed(mix_seed(self.init_seed, i))

        for i, module in enumerate(self.modules()):
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=gen(i, module.weight))
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Router):
                module.weight.normal_(0.0, std, generator=gen(i, module.weight))
                if module.e_score_correction_bias is not None:
                    module.e_score_correction_bias.zero_()
            elif isinstance(module, GroupedExperts):
                module.reset_parameters(std, mix_seed(self.init_seed, i))

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
    def attn_inputs(self, input_ids: torch.Tensor, positions: torch.Tensor | None, cache: LatentCache | None,
                    attn_impl: str = "auto") -> AttnInputs:
        """Rotary tables and the attention mode for one forward (see Transformer.forward)."""
        B, S = input_ids.shape
        if positions is None:
            if S > self.config.max_position_embeddings:
                raise ConfigError(f"sequence length {S} exceeds max_position_embeddings = "
                                  f"{self.config.max_position_embeddings}; shorten the input")
            if cache is not None:
                positions = torch.arange(S, device=input_ids.device).expand(B, S)
        if attn_impl not in ("auto", "plain", "absorbed"):
            raise ConfigError(f"attn_impl = {attn_impl!r}; use 'auto', 'plain' or 'absorbed'")
        absorb = attn_impl == "absorbed" or (attn_impl == "auto" and cache is not None and S == 1)
        cos, sin = self.rotary(torch.arange(S, device=input_ids.device) if positions is None else positions)
        return AttnInputs(cos, sin, positions, cache, absorb)

    def hidden_states(self, input_ids: torch.Tensor, inp: AttnInputs, return_aux: bool = False):
        """Final normed hidden state (B, S, D) (and the embeddings and per-layer balance terms)."""
        emb = self.model.embed_tokens(input_ids)
        schedule = getattr(self, "schedule", None)  # e.g. moeco.parallel.overlap.TwoMicrobatch
        if schedule is not None and schedule.applies(input_ids, inp):
            h, balance = schedule(self, emb, inp, return_aux)
            return self.model.norm(h), emb, balance
        h, balance = emb, []
        for layer in self.model.layers:
            out = layer(h, inp, return_aux)
            h, aux = out if return_aux else (out, None)
            if aux is not None:
                balance.append(aux)
        return self.model.norm(h), emb, balance

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, *,
                cache: LatentCache | None = None, return_mtp: bool = False, return_aux: bool = False,
                attn_impl: str = "auto", last_only: bool = False) -> ModelOutput:
        """One forward over (B, S) token ids; always a ModelOutput.

        positions (B, S): where each token sits in its sequence, so one batch mixes sequences of
        different lengths (negative = padding: nothing written, output ignored). Without them every
        row holds positions 0..S-1. With a `cache` the new tokens' latents are written through it
        and attention covers what it holds at positions up to each query's. attn_impl: "plain"
        (materialised K/V), "absorbed" (over the latents), or "auto" = absorbed for one-token
        decode steps over a cache, plain otherwise.
        """
        inp = self.attn_inputs(input_ids, positions, cache, attn_impl)
        h, emb, balance = self.hidden_states(input_ids, inp, return_aux)
        logits = self.lm_head(h[:, -1:] if last_only else h)

        mtp_logits, prev = [], h
        if return_mtp:
            S = input_ids.shape[1]
            for k, module in enumerate(self.mtp, start=1):
                n = S - k
                if n <= 0:
                    break
                mtp_inp = AttnInputs(inp.cos[..., :n, :], inp.sin[..., :n, :],
                                     None if inp.positions is None else inp.positions[:, :n])
                out = mtp_forward(module, prev[:, :n], emb[:, k:k + n], mtp_inp, return_aux)
                prev, aux = out if return_aux else (out, None)
                if aux is not None:
                    balance.append(aux)
                mtp_logits.append(self.lm_head(module.shared_head.norm(prev)))
        balance_loss = torch.stack(balance).sum() if balance else (h.new_zeros(()) if return_aux else None)
        return ModelOutput(logits, h, mtp_logits, balance_loss)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None,
                  num_layers: int | None = None) -> DenseLatentCache:
        """A dense latent cache for `batch` rows of up to `max_len` positions (see moeco.model.cache)."""
        weight = self.model.embed_tokens.weight
        return DenseLatentCache(self.config, batch, max_len, num_layers=num_layers,
                                dtype=dtype or weight.dtype, device=weight.device)

    # ---- checkpoints ------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path, **kwargs) -> Path:
        """Write the HF/DeepSeek layout (config.json + safetensors) atomically; see moeco.checkpoint."""
        from moeco.checkpoint import save_pretrained

        return save_pretrained(self, path, **kwargs)


def param_count(config: ModelConfig) -> int:
    """Parameters of `Transformer(config)` (MTP included), counted on the meta device: no memory used."""
    with torch.device("meta"):
        model = Transformer(config)
    return sum(p.numel() for p in model.parameters())
