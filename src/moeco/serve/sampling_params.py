"""Per-request generation settings, validated when a request arrives."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moeco.errors import MoecoError


class RequestError(MoecoError, ValueError):
    """A request that cannot run as given; `field` names the offending parameter."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False

    def validate(self, vocab_size: int) -> None:
        def bad(name, value, want):
            raise RequestError(name, f"{name} = {value!r}; {want}")

        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            bad("max_tokens", self.max_tokens, "use an integer >= 1")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            bad("temperature", t, "use a finite number >= 0 (0 = greedy)")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            bad("top_p", p, "use a number in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "use an integer >= 0 (0 = off)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            bad("seed", self.seed, "use an integer")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", self.stop, "use a list of non-empty strings")
        for tid in self.stop_token_ids:
            if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < vocab_size:
                bad("stop_token_ids", tid, f"use token ids in [0, {vocab_size})")
