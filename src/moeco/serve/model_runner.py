"""One engine step on the model: packed batches in, sampled tokens out.

A step runs at most two forwards over the paged cache:
    prefill  (N, S_max) right-padded chunks, per-token positions (padding: -1), plain MLA
    decode   (N, 1 + d) each sequence's last token (and its d draft tokens), absorbed MLA
Slots are computed on the device from the block tables and positions:
    slot = block_tables[b, pos // block_size] * block_size + pos % block_size   (scratch where pos < 0)
On CUDA the decode forward is captured as a CUDA graph for a set of batch sizes and replayed,
the batch padded up to the next captured size (padding rows sit at position -1).
"""

from __future__ import annotations

import torch

from moeco.serve.cache import PagedLatentCache
from moeco.serve.sequence import Sequence


class ModelRunner:
    def __init__(self, model, cache: PagedLatentCache, max_num_seqs: int, max_model_len: int,
                 cuda_graphs: bool = False, graph_batch_sizes: list[int] | None = None, compile: bool = False):
        self.model, self.cache = model, cache
        self.device = model.model.embed_tokens.weight.device
        self.block_size = cache.block_size
        self.max_blocks = -(-max_model_len // cache.block_size)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict]] = {}
        self.graph_sizes: list[int] = []
        self.graph_pool = None
        # torch.compile fuses the decode step's ~70 small kernels per layer (norms, RoPE, routing,
        # residuals); the pool write and the paged kernel are custom operators it leaves alone
        self._decode_fn = torch.compile(self._decode_core, dynamic=True) if compile else self._decode_core
        if cuda_graphs and self.device.type == "cuda":
            sizes = graph_batch_sizes or [1, 2, 4, 8] + list(range(16, max_num_seqs + 1, 16))
            self.graph_sizes = sorted({min(s, max_num_seqs) for s in sizes} | {max_num_seqs})

    # ---- inputs ---------------------------------------------------------------------------------
    def _block_tables(self, seqs: list[Sequence], width: int | None = None) -> torch.Tensor:
        width = width or max(len(s.block_table) for s in seqs)
        rows = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)

    def _set_slots(self, positions: torch.Tensor, block_tables: torch.Tensor) -> None:
        bs = self.block_size
        page = block_tables.gather(1, (positions.clamp(min=0) // bs))
        slots = page * bs + positions.clamp(min=0) % bs
        self.cache.slot_mapping = torch.where(positions >= 0, slots, self.cache.scratch_slot)
        self.cache.block_tables = block_tables

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, block_tables: torch.Tensor, impl: str):
        self._set_slots(positions, block_tables)
        inp = self.model.attn_inputs(ids, positions, self.cache, impl)
        return self.model.hidden_states(ids, inp)[0]

    @torch.inference_mode()
    def idle(self, impl: str) -> None:
        """A forward of no tokens: under expert parallelism a rank without work still runs each MoE
        layer's dispatch and combine (with 0 rows of its own) for the ranks that have some."""
        empty = torch.zeros(0, 1, dtype=torch.long, device=self.device)
        self._forward(empty, empty, empty, impl)

    # ---- prefill --------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, items: list[tuple[Sequence, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward each sequence's next n tokens; (hidden (N, S_max, D), logits at each row's last token (N, V))."""
        N, S = len(items), max(n for _, n in items)
        ids, pos = [], []
        for seq, n in items:
            c = seq.num_computed
            ids.append(seq.token_ids[c:c + n] + [0] * (S - n))
            pos.append(list(range(c, c + n)) + [-1] * (S - n))
        ids_t = torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True)
        pos_t = torch.tensor(pos, dtype=torch.long).to(self.device, non_blocking=True)
        h = self._forward(ids_t, pos_t, self._block_tables([s for s, _ in items]), "plain")
        last = torch.tensor([n - 1 for _, n in items], device=self.device)
        logits = self.model.lm_head(h[torch.arange(N, device=self.device), last])
        return h, logits

    # ---- decode ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward each sequence's last token and its drafts; (hidden (N, 1+d, D), logits (N, 1+d, V))."""
        width = 1 + max(len(s.draft) for s in seqs)
        ids, pos = [], []
        for s in seqs:
            toks = [s.token_ids[-1]] + s.draft
            c = s.num_computed
            ids.append(toks + [0] * (width - len(toks)))
            pos.append(list(range(c, c + len(toks))) + [-1] * (width - len(toks)))
        N = len(seqs)
        size = next((g for g in self.graph_sizes if g >= N), None)
        if size is not None:
            return self._replay(size, width, ids, pos, seqs)
        ids_t = torch.tensor(ids, dtype=torch.long).to(self.device, non_blocking=True)
        pos_t = torch.tensor(pos, dtype=torch.long).to(self.device, non_blocking=True)
        return self._decode_fn(ids_t, pos_t, self._block_tables(seqs))

    def _decode_core(self, ids, pos, block_tables):
        h = self._forward(ids, pos, block_tables, "absorbed")
        return h, self.model.lm_head(h)

    def _replay(self, size: int, width: int, ids, pos, seqs):
        key = (size, width)
        if key not in self.graphs:
            self.graphs[key] = self._capture(size, width)
        graph, io = self.graphs[key]
        N = len(seqs)
        io["ids"].zero_()
        io["pos"].fill_(-1)
        io["bt"].zero_()
        io["ids"][:N] = torch.tensor(ids, dtype=torch.long)
        io["pos"][:N] = torch.tensor(pos, dtype=torch.long)
        bt = torch.zeros(N, self.max_blocks, dtype=torch.long)
        for i, s in enumerate(seqs):
            bt[i, : len(s.block_table)] = torch.tensor(s.block_table)
        io["bt"][:N] = bt
        graph.replay()
        return io["h"][:N], io["logits"][:N]

    def _capture(self, size: int, width: int):
        io = {"ids": torch.zeros(size, width, dtype=torch.long, device=self.device),
              "pos": torch.full((size, width), -1, dtype=torch.long, device=self.device),
              "bt": torch.zeros(size, self.max_blocks, dtype=torch.long, device=self.device)}
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.inference_mode(), torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: Triton and torch.compile compile outside the capture
                self._decode_fn(io["ids"], io["pos"], io["bt"])
            graph = torch.cuda.CUDAGraph()
            if self.graph_pool is None:
                self.graph_pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.graph_pool, stream=stream):
                io["h"], io["logits"] = self._decode_fn(io["ids"], io["pos"], io["bt"])
        torch.cuda.current_stream(self.device).wait_stream(stream)
        return graph, io
