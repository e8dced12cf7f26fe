"""One request's state as the engine sees it: its tokens, how many are in the cache, its blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from moeco.serve.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt, then every token generated so far
    num_prompt_tokens: int
    params: SamplingParams
    arrival: int  # admission order (FIFO among the waiting; newest preempted first)
    status: Status = Status.WAITING
    num_computed: int = 0  # tokens whose latents are in the cache (a prefix of token_ids)
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # prefix-cache keys of its full blocks, in order
    num_cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache at the last admission
    generator: torch.Generator | None = None  # per-request seed
    finish_reason: str | None = None
    error: str | None = None
    emitted: int = 0  # output tokens already handed to the caller
    prefill_only: bool = False  # disaggregated prefill: stop after the first token, keep the blocks for export
    # speculative decoding
    draft: list[int] = field(default_factory=list)  # drafted tokens that follow token_ids
    draft_probs: torch.Tensor | None = None  # the draft's distribution (sampling), one row per draft token
    spec_proposed: int = 0
    spec_accepted: int = 0
    steps: int = 0  # decode steps taken (tokens per step = outputs / steps)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
