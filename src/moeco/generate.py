"""Simple batch generation over the dense latent cache: the reference the serving engine matches.

    prefill: one plain-MLA forward over the left-padded prompts (padding at negative positions,
             so it writes nothing and nothing attends to it), latents written to the cache
    decode:  one absorbed-MLA forward per new token over the cache, every row at its own position

The loop reads nothing back to the host per step: it checks whether every row has finished only
every `CHECK_EVERY` steps, so a CUDA device runs ahead of Python.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from moeco.errors import ConfigError
from moeco.sampling import sample_next

CHECK_EVERY = 16  # steps between host reads of "all rows finished"


def _as_rows(prompts) -> tuple[list[torch.Tensor], bool]:
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ConfigError(f"generate: input_ids has shape {tuple(prompts.shape)}; pass (batch, length) "
                              "token ids, or a list of 1-D prompts of different lengths")
        return list(prompts), True
    if not isinstance(prompts, Sequence) or len(prompts) == 0:
        raise ConfigError("generate: prompts must be a (batch, length) tensor or a non-empty list of token-id lists")
    return [torch.as_tensor(p, dtype=torch.long).flatten() for p in prompts], False


def _check(model, rows, max_new_tokens, temperature, top_p, top_k) -> None:
    cfg = model.config
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"generate: max_new_tokens = {max_new_tokens!r}; use an integer >= 0")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"generate: temperature = {temperature!r}; use a finite number >= 0 (0 = greedy)")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ConfigError(f"generate: top_p = {top_p!r}; use a number in (0, 1] (1 = off)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"generate: top_k = {top_k!r}; use an integer >= 0 (0 = off)")
    for i, row in enumerate(rows):
        if row.numel() == 0:
            raise ConfigError(f"generate: prompt {i} is empty; every prompt needs at least one token")
        lo, hi = int(row.min()), int(row.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ConfigError(f"generate: prompt {i} holds token id {lo if lo < 0 else hi}, outside "
                              f"[0, {cfg.vocab_size}) (vocab_size)")
        if row.numel() + max_new_tokens > cfg.max_position_embeddings:
            raise ConfigError(f"generate: prompt {i} of {row.numel()} tokens + max_new_tokens {max_new_tokens} "
                              f"exceeds max_position_embeddings = {cfg.max_position_embeddings}")


@torch.inference_mode()
def generate(model, prompts, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, eos_token_id: int | None = None, generator: torch.Generator | None = None,
             vocab_limit: int | None = None):
    """Continue each prompt by up to `max_new_tokens` tokens.

    prompts: a (B, P) tensor, or a list of 1-D token-id sequences of different lengths.
    Returns, for a tensor, (B, P + n) with finished rows repeating eos; for a list, one list per
    prompt: the prompt followed by its new tokens, up to and including eos.
    `vocab_limit`: sample only ids below it (a tokenizer smaller than the padded output head).
    """
    rows, was_tensor = _as_rows(prompts)
    _check(model, rows, max_new_tokens, temperature, top_p, top_k)
    device = model.model.embed_tokens.weight.device
    B, lens = len(rows), torch.tensor([r.numel() for r in rows], device=device)
    P = int(lens.max())
    ids = torch.zeros(B, P, dtype=torch.long, device=device)
    for b, r in enumerate(rows):
        ids[b, P - r.numel():] = r.to(device)
    positions = torch.arange(P, device=device)[None, :] - (P - lens)[:, None]  # left padding < 0

    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(B, P + max_new_tokens)
        new, done = [], torch.zeros(B, dtype=torch.bool, device=device)
        if max_new_tokens > 0:
            logits = model(ids, positions, cache=cache, attn_impl="plain", last_only=True).logits
        for step in range(max_new_tokens):
            last = logits[:, -1].float()
            if vocab_limit is not None and vocab_limit < last.shape[-1]:
                last[:, vocab_limit:] = float("-inf")
            nxt = sample_next(last, temperature, top_p, top_k, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            new.append(nxt)
            if step == max_new_tokens - 1:
                break
            if eos_token_id is not None and (step + 1) % CHECK_EVERY == 0 and bool(done.all()):
                break
            logits = model(nxt[:, None], (lens + step)[:, None], cache=cache, attn_impl="absorbed").logits
    finally:
        model.train(was_training)
    new_BN = torch.stack(new, dim=1) if new else ids.new_zeros(B, 0)
    if was_tensor:
        if eos_token_id is not None and new:  # cut where every row had finished (the loop may run past)
            all_done = ((new_BN == eos_token_id).cumsum(1) > 0).all(0)
            if bool(all_done.any()):
                new_BN = new_BN[:, : int(all_done.nonzero()[0]) + 1]
        return torch.cat([ids, new_BN], dim=1)
    out = []
    for r, toks in zip(rows, new_BN.tolist()):
        if eos_token_id is not None and eos_token_id in toks:
            toks = toks[: toks.index(eos_token_id) + 1]
        out.append(r.tolist() + toks)
    return out
