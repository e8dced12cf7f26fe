"""Paged latent blocks: allocation, reference counts and prefix caching.

The pool holds `num_blocks` blocks of `block_size` token slots (moeco.serve.cache). A sequence owns
a block table; token position p lives in slot block_table[p // block_size] * block_size + p % block_size.

Prefix caching: once a block is full, it is keyed by hash(key of the block before it, its tokens),
so equal keys mean equal tokens from position 0 through the block's end, hence equal latents.
A new sequence walks its prompt block by block and reuses every block whose key is known (its
reference count goes up; the tokens are compared too, so a hash collision is never a hit). Blocks
whose count falls to zero go to the free list but keep their key until the block is handed out
again, least recently freed first, so a later request can still hit them.
"""

from __future__ import annotations

from collections import OrderedDict

from moeco.serve.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref = [0] * num_blocks
        self.key = [None] * num_blocks  # prefix-cache key of a full, registered block
        self.tokens: list[tuple | None] = [None] * num_blocks
        self.by_key: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.queried_blocks = self.hit_blocks = 0

    # ---- accounting --------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def hit_rate(self) -> float:
        return self.hit_blocks / self.queried_blocks if self.queried_blocks else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ------------------------------------------------------------------------
    @staticmethod
    def chain_key(prev_key: int | None, tokens: tuple) -> int:
        return hash((prev_key, tokens))

    def match_prefix(self, token_ids: list[int], max_tokens: int) -> list[int]:
        """Cached blocks that hold token_ids[:k * block_size] for the largest k with k * block_size <= max_tokens."""
        bs, found, prev = self.block_size, [], None
        for i in range(max_tokens // bs):
            tokens = tuple(token_ids[i * bs:(i + 1) * bs])
            prev = self.chain_key(prev, tokens)
            block = self.by_key.get(prev)
            if block is None or self.tokens[block] != tokens:
                break
            found.append(block)
        return found

    def register_full_blocks(self, seq: Sequence) -> None:
        """Key every block of `seq` that is now full of computed tokens."""
        bs = self.block_size
        while len(seq.block_hashes) < seq.num_computed // bs:
            i = len(seq.block_hashes)
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            key = self.chain_key(seq.block_hashes[-1] if seq.block_hashes else None, tokens)
            seq.block_hashes.append(key)
            block = seq.block_table[i]
            if key not in self.by_key and self.key[block] is None:
                self.by_key[key], self.key[block], self.tokens[block] = block, key, tokens

    # ---- allocation --------------------------------------------------------------------------
    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        if self.key[block] is not None:  # its old contents are overwritten: forget them
            del self.by_key[self.key[block]]
            self.key[block] = self.tokens[block] = None
        self.ref[block] = 1
        return block

    def _assign(self, seq: Sequence, hits: list[int], need: int) -> None:
        """Give `seq` the cached blocks `hits` (reference counted) and `need` fresh ones."""
        self.hit_blocks += len(hits)
        for b in hits:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1
        seq.block_table = hits + [self._take_free() for _ in range(need)]
        seq.block_hashes = [self.key[b] for b in hits]

    def admit(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give a waiting sequence its cached prefix and blocks for its next `num_new_tokens` tokens.

        At least one token is left to compute (its logits give the next token). False, with nothing
        changed, when the free blocks do not suffice.
        """
        hits = self.match_prefix(seq.token_ids, len(seq.token_ids) - 1)
        cached = len(hits) * self.block_size
        num_new_tokens = min(num_new_tokens, len(seq.token_ids) - cached)
        revived = sum(1 for b in hits if self.ref[b] == 0)  # hit blocks that sit on the free list
        need = self.blocks_for(cached + num_new_tokens) - len(hits)
        if need > self.num_free - revived:
            return False
        self.queried_blocks += len(seq.token_ids) // self.block_size
        self._assign(seq, hits, need)
        seq.num_computed = seq.num_cached_prompt_tokens = cached
        return True

    def admit_import(self, seq: Sequence) -> bool:
        """Blocks for a sequence whose whole prompt arrives from a prefill worker (disaggregation):
        cached prefix blocks are reused (`seq.num_cached_prompt_tokens` tells how many tokens need not be
        sent), fresh blocks cover the rest and the first decode position. False, nothing changed, when
        the free blocks do not suffice."""
        n = len(seq.token_ids)
        hits = self.match_prefix(seq.token_ids, n)
        revived = sum(1 for b in hits if self.ref[b] == 0)
        need = self.blocks_for(n + 1) - len(hits)
        if need > self.num_free - revived:
            return False
        self.queried_blocks += n // self.block_size
        self._assign(seq, hits, need)
        seq.num_computed = 0  # nothing readable until the import lands
        seq.num_cached_prompt_tokens = len(hits) * self.block_size
        return True

    def can_grow(self, seq: Sequence, upto: int) -> bool:
        return self.blocks_for(upto) - len(seq.block_table) <= self.num_free

    def grow(self, seq: Sequence, upto: int) -> None:
        """Blocks for every position < upto (the caller checked can_grow)."""
        while len(seq.block_table) < self.blocks_for(upto):
            seq.block_table.append(self._take_free())

    def release(self, seq: Sequence) -> None:
        """Return a sequence's blocks; its tail goes first to the free list, so it is evicted first."""
        for block in reversed(seq.block_table):
            self.ref[block] -= 1
            if self.ref[block] == 0:
                self.free[block] = None
        seq.block_table, seq.block_hashes = [], []
        seq.num_computed = 0
