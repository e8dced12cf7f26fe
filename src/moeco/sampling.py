"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling."""

from __future__ import annotations

import torch


def sample_next(logits_BV: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids (B,). temperature 0 is greedy; top_k 0 and top_p 1 disable those filters."""
    if temperature <= 0:
        return logits_BV.argmax(dim=-1)
    logits = logits_BV / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def filtered_probs(logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_p_B: torch.Tensor,
                   top_k_B: torch.Tensor) -> torch.Tensor:
    """Per-row sampling distributions (B, V) float32: temperature, then top-k, then top-p.

    Rows with temperature 0 get a distribution too (at temperature 1); callers take argmax there.
    top_k 0 and top_p 1 disable those filters, row by row.
    """
    V = logits_BV.shape[-1]
    t = torch.where(temperature_B > 0, temperature_B, torch.ones_like(temperature_B))
    logits = logits_BV.float() / t[:, None]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k_B > 0, top_k_B.clamp(max=V), torch.full_like(top_k_B, V))
    rank = torch.arange(V, device=logits.device)[None, :]
    drop = rank >= k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    drop |= probs.cumsum(dim=-1) - probs >= top_p_B[:, None]  # mass before the token already reaches top_p
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.zeros_like(logits).scatter_(1, order, sorted_logits.softmax(dim=-1))


def sample_rows(logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_p_B: torch.Tensor,
                top_k_B: torch.Tensor, generators: list[torch.Generator | None] | None = None,
                all_greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next token per row (B,) with per-row settings, and the distributions sampled from (None if greedy).

    Rows with a generator (a request's own seed) draw from it, the rest from the global RNG, so a
    seeded request gives the same tokens whatever else shares its batch.
    """
    greedy = logits_BV.argmax(dim=-1)
    if all_greedy:
        return greedy, None
    probs = filtered_probs(logits_BV, temperature_B, top_p_B, top_k_B)
    drawn = torch.multinomial(probs, 1).squeeze(-1)
    for i, gen in enumerate(generators or []):
        if gen is not None:
            drawn[i] = torch.multinomial(probs[i], 1, generator=gen)[0]
    return torch.where(temperature_B > 0, drawn, greedy), probs
