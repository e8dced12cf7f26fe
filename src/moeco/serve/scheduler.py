"""Continuous batching: which sequences run this step, and how many of their tokens.

Every step has a token budget (`max_num_batched_tokens`). Running sequences go first, oldest
first: a decoding one takes 1 token (plus its draft tokens when speculating), one still in its
prompt takes the next chunk that fits the budget (chunked prefill: a long prompt spreads over steps
instead of stalling every decode). Then waiting sequences are admitted, oldest first, while the
budget, `max_num_seqs` and the free blocks allow; a prompt prefix found in the prefix cache costs
nothing. When a running sequence needs a block and none is free, the newest running sequence is
preempted: its blocks are released and it goes back to the front of the queue, to be recomputed
from its tokens (prompt and output so far) when it is admitted again; nothing it produced is lost.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from moeco.serve.block_manager import BlockManager
from moeco.serve.sequence import Sequence, Status


@dataclass
class Batch:
    prefills: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, tokens this step)
    decodes: list[Sequence] = field(default_factory=list)  # one token each (+ its draft)

    def __bool__(self) -> bool:
        return bool(self.prefills or self.decodes)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted) and return its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.release(seq)
        seq.status, seq.draft, seq.draft_probs = Status.WAITING, [], None
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> Batch:
        batch, budget = Batch(), self.max_num_batched_tokens
        for seq in list(self.running):
            if seq.status is not Status.RUNNING or budget <= 0:
                continue
            remaining = len(seq.token_ids) - seq.num_computed
            decoding = remaining == 1
            n = 1 + len(seq.draft) if decoding else min(remaining, budget)
            upto = seq.num_computed + n
            while not self.blocks.can_grow(seq, upto):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            self.blocks.grow(seq, upto)
            budget -= n
            if decoding:
                batch.decodes.append(seq)
            else:
                batch.prefills.append((seq, n))

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.admit(seq, budget):
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            budget -= n
            batch.prefills.append((seq, n))
        return batch
