"""A GPU tier of evicted KV at low precision: recall that saves the memory.

The emulation (kara_sglang/recall.py) keeps a compressed request's evicted slots allocated in
SGLang's pool. With a tier, a compression instead quantises the evicted tokens' K and V (every
layer) into this tier, at 2, 4 or 8 bits per value with a float16 minimum and step per 32
channels, and the pool slots go back to SGLang, as plain Kara frees them. Each decode step then
ranks a request's tier tokens by their quantised keys and attends to its resident tokens plus
the top R (kernels/recall_tier.py). The accuracy grid chose 4 bits: through the server, 4-bit
recalled K and V kept every answer full KV kept on the finished problems, 2 bits lost many
(docs/accuracy.md).

Two-stage ranking (``pages``): the tier also keeps, per 16-column page of each row, layer and KV
head, the max and min of the page's dequantised keys (kernels/recall_pages.py), computed when a
compression stores the page's tokens; a step then ranks pages by Quest's bound and only the
best pages' tokens by their keys. Bound pages are allocated as rows grow and freed with them.

Bounded: the tier holds ``capacity`` tokens, allocated once at start-up. A window whose evicted
tokens do not fit (the tier, or the request's row of it, is full) is evicted as without recall:
those tokens are gone, counted in ``fallback_tokens``. A horizon (``drop_oldest``, decided by
the adapter) bounds each request instead: before a window is stored, the request's oldest tier
tokens go, whole pages at a time, counted in ``dropped_tokens``. A request's tier tokens go
back when the request ends (finish, abort, retraction), so an idle server holds none.

Engine-independent: tensors in, tensors out; the adapter decides when to store and release.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

from kara_kernels.recall_pages import PAGE, page_bounds
from kara_kernels.recall_tier import QUANT_GROUP, quantize_to_tier, tier_bytes_per_token
from kara_sglang.recall import RecallStore


class RecallTier:
    """Quantised K and V of evicted tokens, per layer, and which request holds which tier slot.

    ``rows`` (a :class:`RecallStore` of tier slots) lists each ``req_to_token`` row's tier
    slots in eviction order, so recall's ranking indexes them as the emulation indexes held
    pool slots. Free tier slots sit in a device stack whose height is known on the host.
    """

    def __init__(self, num_layers: int, capacity: int, kv_heads: int, head_dim: int, v_head_dim: int,
                 bits: int, rows: int, row_capacity: int, device: torch.device, pages: bool = False) -> None:
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
        self.dropped_tokens = 0
        self.page_table = None
        if pages:
            # A row of n tokens uses ceil(n / PAGE) bound pages: all rows together at most the
            # tier's pages plus one partial page per row.
            n_bound = self.bound_pages(capacity, rows)
            self.page_table = torch.zeros(rows, -(-row_capacity // PAGE), dtype=torch.int64, device=device)
            self.page_hi = torch.zeros(num_layers, n_bound, kv_heads, head_dim, dtype=torch.float16, device=device)
            self.page_lo = torch.zeros_like(self.page_hi)
            self.free_pages = torch.arange(n_bound, dtype=torch.int64, device=device)
            self.n_free_pages = n_bound

    @staticmethod
    def bound_pages(capacity: int, rows: int) -> int:
        return -(-capacity // PAGE) + rows

    @staticmethod
    def bytes_needed(num_layers: int, capacity: int, kv_heads: int, head_dim: int, v_head_dim: int,
                     bits: int, rows: int = 0, pages: bool = False) -> int:
        """The tier's bytes; with ``pages``, the page bounds too (two float16 per channel, KV
        head and layer for every 16 tokens, plus a partial page per row)."""
        tier = capacity * tier_bytes_per_token(num_layers, kv_heads, head_dim, v_head_dim, bits)
        bounds = RecallTier.bound_pages(capacity, rows) * num_layers * kv_heads * head_dim * 4 if pages else 0
        return tier + bounds

    @property
    def pages_held(self) -> int:
        """Bound pages owned by rows (two-stage ranking; 0 without it)."""
        return 0 if self.page_table is None else self.free_pages.numel() - self.n_free_pages

    @property
    def held(self) -> int:
        """Tier slots owned by requests (``capacity - held`` are free)."""
        return self.capacity - self.n_free

    def layer_pages(self, layer_id: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(page_table, page_hi, page_lo) of one layer (two-stage ranking)."""
        return self.page_table, self.page_hi[layer_id], self.page_lo[layer_id]

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
        # Each entry's count before it is appended (a row listed twice grows twice).
        counts, before = {}, []
        for row, n in zip(keep_rows, keep_counts):
            have = counts.get(row, self.rows.count(row))
            before.append(have)
            counts[row] = have + n
        self.rows.hold(keep_rows, keep_counts, dst)
        if self.page_table is not None:
            self._store_bounds(keep_rows, before, [b + n for b, n in zip(before, keep_counts)])
        self.stored_tokens += total
        return total

    def _store_bounds(self, rows: Sequence[int], before: Sequence[int], after: Sequence[int]) -> None:
        """Bound pages for the rows' new pages, then the bounds of every page the store touched
        (a row's partial last page included: it gained tokens)."""
        for row, b, a in zip(rows, before, after):
            first_new, end = -(-b // PAGE), -(-a // PAGE)
            n = end - first_new
            if n:
                self.page_table[row, first_new:end] = self.free_pages[self.n_free_pages - n:self.n_free_pages]
                self.n_free_pages -= n
        device = self.page_table.device
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)  # noqa: E731
        rows_t, lens_t = as_tensor(list(rows)), as_tensor(list(after))
        first_t, end_t = as_tensor([b // PAGE for b in before]), as_tensor([-(-a // PAGE) for a in after])
        for layer_id in range(self.k_codes.shape[0]):
            page_bounds(*self.layer(layer_id)[:3], self.rows.slots, rows_t, lens_t, first_t, end_t, self.bits,
                        *self.layer_pages(layer_id))

    @staticmethod
    def horizon_drop(count: int, incoming: int, horizon: int) -> int:
        """How many of a row's ``count`` oldest tier tokens must go so that ``incoming`` more
        leave it at most ``horizon``: whole 16-token pages (the remaining pages' bounds stay
        valid), or the whole row."""
        excess = count + incoming - horizon
        if excess <= 0:
            return 0
        return min(count, -(-excess // PAGE) * PAGE)

    def drop_oldest(self, row: int, n: int) -> None:
        """The row's ``n`` oldest tier tokens go back to the free stack (a multiple of 16, or all
        of them: :meth:`horizon_drop`) and its later tokens move to the front of its row, so a
        ranking sees only what remains. Device work in stream order, no host sync."""
        count = self.rows.count(row)
        if n <= 0:
            return
        if n != count and n % PAGE:
            raise AssertionError(f"kara recall tier: dropping {n} of {count} tokens splits a page")
        if n == count:
            self.release(row)
        else:
            slots = self.rows.slots
            self._free_slots(slots[row, :n])
            slots[row, :count - n] = slots[row, n:count].clone()
            self.rows.set_count(row, count - n)
            if self.page_table is not None:
                gone, pages = n // PAGE, -(-count // PAGE)
                self._free_pages(self.page_table[row, :gone])
                self.page_table[row, :pages - gone] = self.page_table[row, gone:pages].clone()
        self.dropped_tokens += n

    def _free_slots(self, slots: torch.Tensor) -> None:
        """Push tier slots onto the free stack."""
        n = int(slots.numel())
        self.free_slots[self.n_free:self.n_free + n] = slots
        self.n_free += n

    def _free_pages(self, pages: torch.Tensor) -> None:
        """Push bound pages onto their free stack."""
        n = int(pages.numel())
        self.free_pages[self.n_free_pages:self.n_free_pages + n] = pages
        self.n_free_pages += n

    def release(self, row: int) -> int:
        """The row's tier slots (and bound pages) go back to their free stacks; returns how many slots."""
        slots = self.rows.release(row)
        n = int(slots.numel())
        if n:
            self._free_slots(slots)
        if n and self.page_table is not None:
            self._free_pages(self.page_table[row, :-(-n // PAGE)])
        return n

    def check_free_once(self) -> None:
        """Debug check: every free tier slot is listed once (a double release would repeat one)."""
        free = self.free_slots[:self.n_free]
        if free.unique().numel() != self.n_free:
            raise AssertionError("kara recall tier: a tier slot is free twice")
        if self.page_table is not None:
            used = [self.page_table[row, :-(-n // PAGE)] for row, n in self.rows.counts_by_row().items()]
            pages = torch.cat([self.free_pages[:self.n_free_pages], *used])
            if pages.numel() != self.free_pages.numel() or pages.unique().numel() != pages.numel():
                raise AssertionError("kara recall tier: a bound page is lost, free twice or used by two rows")
