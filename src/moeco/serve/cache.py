"""The paged latent pool: every layer's [c ; kr] rows in fixed-size blocks shared by all sequences.

    pool  (L, (num_blocks + 1) * block_size, d_c + dr)   the last block is scratch: padding writes land there
    a sequence's token at position p:  slot = block_table[p // block_size] * block_size + p % block_size

Before each forward the model runner sets the step's `slot_mapping` (B, S) (where each new token
goes; scratch for padding) and `block_tables` (B, max_blocks) (each row's blocks, padded with any
block: positions past a row's own are masked out by `visible`). MLA then writes and reads through
`layer(i)` as through the dense cache; `read()` gathers a row's blocks, the plain-PyTorch reference.
On CUDA, decode uses `attend_absorbed`, a Triton kernel that reads the blocks in place
(moeco.serve.kernels).
"""

from __future__ import annotations

import copy

import torch

from moeco.config import ModelConfig


# The pool write and the decode kernel as custom operators: opaque to torch.compile (no graph break,
# and the in-place write stays in place instead of being functionalized into a copy of the pool).
@torch.library.custom_op("moeco::paged_write", mutates_args=("pool",))
def paged_write(pool: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    pool.index_copy_(0, slots, rows.to(pool.dtype))


@paged_write.register_fake
def _(pool, slots, rows):
    return None


@torch.library.custom_op("moeco::paged_mla_decode", mutates_args=())
def paged_decode_op(q_latent: torch.Tensor, q_rot: torch.Tensor, pool: torch.Tensor, block_tables: torch.Tensor,
                    positions: torch.Tensor, scale: float, block_size: int) -> torch.Tensor:
    from moeco.serve.kernels import paged_mla_decode

    return paged_mla_decode(q_latent, q_rot, pool, block_tables, positions, scale, block_size)


@paged_decode_op.register_fake
def _(q_latent, q_rot, pool, block_tables, positions, scale, block_size):
    return q_latent.new_empty(q_latent.shape, dtype=torch.float32)


class _PagedLayer:
    def __init__(self, cache: "PagedLatentCache", layer_id: int):
        self.cache, self.pool = cache, cache.pool[layer_id]  # (slots + scratch, C)

    def write(self, new_BSC, positions_BS):
        paged_write(self.pool, self.cache.slot_mapping.flatten(), new_BSC.flatten(0, 1))

    def read(self):
        c = self.cache
        B, nb = c.block_tables.shape
        blocks = self.pool.view(-1, c.block_size, self.pool.shape[-1])
        rows = blocks[c.block_tables].view(B, nb * c.block_size, self.pool.shape[-1])
        return rows, c.key_positions[: nb * c.block_size]

    @property
    def attend_absorbed(self):
        if not self.cache.use_kernel:
            return None
        return self._kernel

    def _kernel(self, q_latent_BSHC, q_rot_BSHR, positions_BS, scale):
        c = self.cache
        return paged_decode_op(q_latent_BSHC, q_rot_BSHR, self.pool, c.block_tables, positions_BS, float(scale),
                               c.block_size)


class PagedLatentCache:
    def __init__(self, config: ModelConfig, num_layers: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str, use_kernel: bool = False):
        self.block_size, self.num_blocks = block_size, num_blocks
        self.pool = torch.zeros(num_layers, (num_blocks + 1) * block_size, config.latent_dim, dtype=dtype,
                                device=device)
        self.scratch_slot = num_blocks * block_size
        self.key_positions = torch.arange((num_blocks + 1) * block_size, device=device)
        self.use_kernel = use_kernel
        self.slot_mapping: torch.Tensor | None = None
        self.block_tables: torch.Tensor | None = None
        self._layers = [_PagedLayer(self, i) for i in range(num_layers)]

    def layer(self, layer_id: int) -> _PagedLayer:
        return self._layers[layer_id]

    def rows(self, lo: int, hi: int) -> "PagedLatentCache":
        """This step's batch rows lo..hi-1 (a micro-batch): the same pool, those rows' slots and block tables."""
        view = copy.copy(self)
        view.slot_mapping, view.block_tables = self.slot_mapping[lo:hi], self.block_tables[lo:hi]
        view._layers = [_PagedLayer(view, i) for i in range(len(self._layers))]
        return view

    def bytes_per_token(self) -> int:
        """Bytes one token occupies across all layers: exactly the latent, (d_c + dr) x layers x dtype."""
        layers, _, dim = self.pool.shape
        return layers * dim * self.pool.element_size()

    @staticmethod
    def bytes_per_block(config: ModelConfig, num_layers: int, block_size: int, dtype: torch.dtype) -> int:
        return num_layers * block_size * config.latent_dim * torch.empty(0, dtype=dtype).element_size()
