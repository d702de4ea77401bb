"""Per-request ring of the queries captured while decoding.

The KV cache holds no queries, but bidirectional scoring needs the queries of the whole
tail. Each decode step writes the new token's query of every voting layer into its
request's row, at ring slot ``decoded_index % ring``: with a ring of ``W + U`` the row
always holds exactly the current tail (scoring is bidirectional, so the order of queries in
the ring does not matter). Writes are plain tensor index-puts on static buffers, so they
are captured and replayed by CUDA graphs with no host sync.

Memory (bf16, per request, ``vote_heads="group"``):
``len(vote_layers) * (W + U) * kv_heads * head_dim * 2`` bytes. Llama-3.1-8B (8 KV heads,
head_dim 128), 4 voting layers, W=512, U=64: 4.7 MB per running request, against 48 MB of
KV (128 KB per token, 32 layers) freed by every compressed window at 25% keep.
``vote_heads="all"`` stores every query head: GQA-ratio (4x) more.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch


class QueryBuffer:
    """``data``: ``[rows, n_vote_layers, ring, stored_heads, head_dim]``."""

    def __init__(self, rows: int, vote_layers: Sequence[int], ring: int, q_heads: int,
                 kv_heads: int, head_dim: int, vote_heads: str = "group",
                 dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu") -> None:
        if q_heads % kv_heads:
            raise ValueError(f"{q_heads} query heads do not group over {kv_heads} KV heads")
        self.vote_layers = tuple(vote_layers)
        self.ring = ring
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim
        self.pool_group = vote_heads == "group"
        stored = kv_heads if self.pool_group else q_heads
        self.data = torch.zeros(rows, len(self.vote_layers), ring, stored, head_dim,
                                dtype=dtype, device=device)
        self._index: Dict[int, int] = {layer: i for i, layer in enumerate(self.vote_layers)}

    def votes(self, layer_id: int) -> bool:
        return layer_id in self._index

    def k_buffers_of(self, k_buffers: Sequence[torch.Tensor]) -> list:
        """The voting layers' K buffers, in the buffer's layer order."""
        return self.buffers_of(k_buffers)

    def buffers_of(self, buffers: Sequence[torch.Tensor]) -> list:
        """The voting layers' entries of a per-layer list (K or V buffers), in layer order."""
        return [buffers[layer] for layer in self.vote_layers]

    def capture(self, layer_id: int, q: torch.Tensor, rows: torch.Tensor,
                ring_pos: torch.Tensor) -> None:
        """Store the decode queries ``q`` (``[bs, q_heads * head_dim]`` or ``[bs, q_heads, head_dim]``)
        of one voting layer at ``data[rows, layer, ring_pos]``."""
        q = q.reshape(q.shape[0], self.q_heads, self.head_dim)
        if self.pool_group:
            q = q.view(q.shape[0], self.kv_heads, -1, self.head_dim).float().mean(dim=2)
        self.data[rows, self._index[layer_id], ring_pos] = q.to(self.data.dtype)
