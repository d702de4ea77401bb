"""A GPU tier of evicted KV at low precision: recall that saves the memory.

The emulation (kara_sglang/recall.py) keeps a compressed request's evicted slots allocated in
SGLang's pool. With a tier, a compression instead quantises the evicted tokens' K and V (every
layer) into this tier, at 2, 4 or 8 bits per value with a float16 minimum and step per 32
channels, and the pool slots go back to SGLang, as plain Kara frees them. Each decode step then
ranks a request's tier tokens by their quantised keys and attends to its resident tokens plus
the top R (kernels/recall_tier.py). The accuracy grid chose 4 bits: through the server, 4-bit
recalled K and V kept every answer full KV kept on the finished problems, 2 bits lost many
(docs/accuracy.md).

Bounded: the tier holds ``capacity`` tokens, allocated once at start-up. A window whose evicted
tokens do not fit (the tier, or the request's row of it, is full) is evicted as without recall:
those tokens are gone, counted in ``fallback_tokens``. A request's tier tokens go back when the
request ends (finish, abort, retraction), so an idle server holds none.

Engine-independent: tensors in, tensors out; the adapter decides when to store and release.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from kara_kernels.recall_tier import QUANT_GROUP, quantize_to_tier, tier_bytes_per_token
from kara_sglang.recall import RecallStore


class RecallTier:
    """Quantised K and V of evicted tokens, per layer, and which request holds which tier slot.

    ``rows`` (a :class:`RecallStore` of tier slots) lists each ``req_to_token`` row's tier
    slots in eviction order, so recall's ranking indexes them as the emulation indexes held
    pool slots. Free tier slots sit in a device stack whose height is known on the host.
    """

    def __init__(self, num_layers: int, capacity: int, kv_heads: int, head_dim: int, v_head_dim: int,
                 bits: int, rows: int, row_capacity: int, device: torch.device) -> None:
        if head_dim % QUANT_GROUP or v_head_dim % QUANT_GROUP:
            raise ValueError(f"the recall tier needs head dims divisible by {QUANT_GROUP}, got {head_dim}/{v_head_dim}")
        self.bits, self.capacity = bits, capacity

        def codes(dim: int) -> torch.Tensor:
            return torch.zeros(num_layers, capacity, kv_heads, dim * bits // 8, dtype=torch.uint8, device=device)

        def scales(dim: int) -> torch.Tensor:
            return torch.zeros(num_layers, capacity, kv_heads, dim // QUANT_GROUP, dtype=torch.float16, device=device)

        self.k_codes, self.k_lo, self.k_step = codes(head_dim), scales(head_dim), scales(head_dim)
        self.v_codes, self.v_lo, self.v_step = codes(v_head_dim), scales(v_head_dim), scales(v_head_dim)
        self.free_slots = torch.arange(capacity, dtype=torch.int64, device=device)
        self.n_free = capacity
        self.rows = RecallStore(rows, row_capacity, device)
        self.stored_tokens = 0
        self.fallback_tokens = 0

    @staticmethod
    def bytes_needed(num_layers: int, capacity: int, kv_heads: int, head_dim: int, v_head_dim: int,
                     bits: int) -> int:
        return capacity * tier_bytes_per_token(num_layers, kv_heads, head_dim, v_head_dim, bits)

    @property
    def held(self) -> int:
        """Tier slots owned by requests (``capacity - held`` are free)."""
        return self.capacity - self.n_free

    def layer(self, layer_id: int) -> Tuple[torch.Tensor, ...]:
        """One layer's (k_codes, k_lo, k_step, v_codes, v_lo, v_step) views."""
        return (self.k_codes[layer_id], self.k_lo[layer_id], self.k_step[layer_id],
                self.v_codes[layer_id], self.v_lo[layer_id], self.v_step[layer_id])

    def store(self, rows: Sequence[int], per_row: Sequence[int], pool_slots: torch.Tensor,
              k_buffers: List[torch.Tensor], v_buffers: List[torch.Tensor]) -> int:
        """Quantise the evicted tokens of each row's window (``per_row[i]`` of the concatenated
        ``pool_slots`` for ``rows[i]``) into the tier, whole windows only; returns the tokens
        stored. The caller then frees every pool slot, stored or not."""
        keep_rows, keep_counts, picks, start = [], [], [], 0
        room, width = self.n_free, self.rows.slots.shape[1]
        for row, n in zip(rows, per_row):
            if n and n <= room and self.rows.count(row) + n <= width:
                keep_rows.append(row)
                keep_counts.append(n)
                picks.append(pool_slots[start:start + n])
                room -= n
            else:
                self.fallback_tokens += n
            start += n
        total = sum(keep_counts)
        if total == 0:
            return 0
        src = torch.cat(picks)
        dst = self.free_slots[self.n_free - total:self.n_free].clone()
        self.n_free -= total
        for layer_id, (k_buffer, v_buffer) in enumerate(zip(k_buffers, v_buffers)):
            quantize_to_tier(k_buffer, v_buffer, src, dst, *self.layer(layer_id), self.bits)
        self.rows.hold(keep_rows, keep_counts, dst)
        self.stored_tokens += total
        return total

    def release(self, row: int) -> int:
        """The row's tier slots go back to the free stack; returns how many."""
        slots = self.rows.release(row)
        n = int(slots.numel())
        if n:
            self.free_slots[self.n_free:self.n_free + n] = slots
            self.n_free += n
        return n

    def check_free_once(self) -> None:
        """Debug check: every free tier slot is listed once (a double release would repeat one)."""
        free = self.free_slots[:self.n_free]
        if free.unique().numel() != self.n_free:
            raise AssertionError("kara recall tier: a tier slot is free twice")
