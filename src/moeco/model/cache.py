"""The latent cache interface MLA reads and writes through, and its dense implementation.

MLA caches one row per token and layer, [c_t ; kr_t] of d_c + dr values (`ModelConfig.latent_dim`).
Where those rows live is the cache's business: a dense (batch, max_len) buffer here, fixed-size
blocks of a shared pool in the serving engine (moeco.serve.cache). MLA only calls

    layer = cache.layer(i)
    layer.write(new_BSC, positions_BS)        # store the new tokens' rows at their positions
    latent_BTC, key_pos = layer.read()        # for each of the B rows: the rows to attend over

with `key_pos` (T,) or (B, T) the position each row holds (negative: a slot that holds nothing).
A cache may also offer `attend_absorbed(q_latent, q_rot, positions, scale)`, a kernel that runs
absorbed attention over its own layout without gathering the rows first; MLA uses it for decode
when present, and `read()` (the reference) otherwise. A query at position p sees the keys whose position k satisfies
0 <= k <= p (`visible`). A negative query position marks padding: it writes nothing and its
output is ignored by the caller.
"""

from __future__ import annotations

from typing import Protocol

import torch

from moeco.config import ModelConfig


class CacheLayer(Protocol):
    def write(self, new_BSC: torch.Tensor, positions_BS: torch.Tensor) -> None:
        """Store the new rows (B, S, d_c + dr) at their positions."""
        ...

    def read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows to attend over (B, T, d_c + dr), their positions (T,) or (B, T)) for the rows last written."""
        ...


class LatentCache(Protocol):
    def layer(self, layer_id: int) -> CacheLayer:
        ...


def visible(q_pos_BS: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
    """(B, S, T) bool: query at position p sees key at position k iff 0 <= k <= max(p, 0).

    Padding queries (p < 0) see position 0 so that their softmax row is never empty (no NaN);
    their outputs are discarded by whoever padded them.
    """
    q = q_pos_BS.clamp(min=0)[..., None]
    k = k_pos[:, None, :] if k_pos.dim() == 2 else k_pos
    return (k <= q) & (k >= 0)


class _DenseLayer:
    def __init__(self, cache: "DenseLatentCache", layer_id: int):
        self.cache, self.layer_id = cache, layer_id

    def write(self, new_BSC, positions_BS):
        c = self.cache
        self.batch = B = new_BSC.shape[0]
        buf = c.latent[self.layer_id, :B]  # (B, T_max + 1, C): the last slot takes padding writes
        slot = torch.where(positions_BS >= 0, positions_BS, c.max_len)
        buf.scatter_(1, slot[..., None].expand(-1, -1, buf.shape[-1]), new_BSC.to(buf.dtype))

    def read(self):
        c = self.cache
        return c.latent[self.layer_id, : self.batch, : c.max_len], c.key_positions


class DenseLatentCache:
    """One (L, B, T_max, d_c + dr) buffer: row b's token at position p lives at [:, b, p].

    The simple cache `moeco.generate` uses: static shapes, no host bookkeeping, every step attends
    over all T_max slots with the positions not yet written masked out.
    """

    def __init__(self, config: ModelConfig, batch: int, max_len: int, *, num_layers: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        layers = config.num_hidden_layers if num_layers is None else num_layers
        self.max_len = max_len
        self.latent = torch.zeros(layers, batch, max_len + 1, config.latent_dim, dtype=dtype, device=device)
        self.key_positions = torch.arange(max_len, device=device)
        self._layers = [_DenseLayer(self, i) for i in range(layers)]

    def layer(self, layer_id: int) -> _DenseLayer:
        return self._layers[layer_id]

    def bytes_per_token(self) -> int:
        """Bytes one token occupies across all layers (equals ModelConfig.kv_cache_bytes_per_token)."""
        layers, _, _, dim = self.latent.shape
        return layers * dim * self.latent.element_size()
