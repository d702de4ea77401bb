"""Recall: evicted KV that a later decode step looks up is attended to again (emulated).

Kara decides what to keep before the lookup that needs it exists; recall lets each decode
step choose, from its own query, which evicted tokens to attend to. This module is the
*emulation* that measures what recall does to answers: a compressed request's evicted slots
are not freed but held here (their KV stays where it was: with page size 1 compaction only
rewrites the ``req_to_token`` row), and each decode step attends, per layer and KV head, to
the request's resident tokens plus the ``tokens`` evicted tokens its digest ranks highest.
Memory is not saved (the held slots stay allocated until the request ends); the point is the
accuracy answer, through the real scheduler.

Digests (what ranks the evicted tokens; the probe in benchmarks/reasoning/recall_probe.py):
``exact`` q·k with the real keys; ``bitsN`` q·k' with k' the key quantised per token and KV
head to N bits, asymmetric min/max in groups of 32 channels (computed from the keys in the
ranking kernel, kernels/recall.py). A token's score for a KV head is the max over its GQA
group's query heads. ``--kara-recall-kv bitsN`` attends to the selected tokens' K and V
rounded the same way (the accuracy of keeping evicted KV at low precision). Lag 0 ranks with
the step's own query; lag 1 with the previous step's (what a system fetching ahead of the step
would have).

Engine-independent: tensors in, tensors out; the work is two Triton launches and a top-k.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch

from kara_kernels.recall import rank_evicted, recall_decode
from kara_kernels.recall_buffer import refresh_recall_buffer
from kara_kernels.recall_pages import PAGE, select_two_stage
from kara_kernels.recall_tier import fill_recall_buffer, rank_tier, recall_decode_tier
from kara_kernels.select_top import top_columns
from kara_sglang.recall_tune import SECOND_STAGE_LAUNCH, FillLaunch


def bits_of(setting: str) -> int:
    """``exact`` -> 0, ``bitsN`` -> N (digest and recalled-KV settings share the names)."""
    return 0 if setting == "exact" else int(setting[len("bits"):])


class RecallStore:
    """The evicted slots each ``req_to_token`` row holds, in eviction order.

    ``slots[row, :count(row)]`` on the device; the counts are kept on the host too (they
    change only at compressions and releases, which the host schedules), so a step never
    reads the device to size its work.
    """

    def __init__(self, rows: int, capacity: int, device: torch.device) -> None:
        self.slots = torch.zeros(rows, capacity, dtype=torch.int64, device=device)
        self.counts = torch.zeros(rows, dtype=torch.int64, device=device)
        self._host: Dict[int, int] = {}  # row -> held slots (rows holding none are absent)

    @property
    def held(self) -> int:
        """Slots held over all rows (allocated, owned by no row of SGLang's)."""
        return sum(self._host.values())

    @property
    def longest(self) -> int:
        return max(self._host.values(), default=0)

    def count(self, row: int) -> int:
        return self._host.get(row, 0)

    def counts_by_row(self) -> Dict[int, int]:
        """Each row holding slots -> how many (host copy)."""
        return dict(self._host)

    def hold(self, rows: Sequence[int], per_row: Sequence[int], slots: torch.Tensor) -> None:
        """Append ``slots`` (concatenated, ``per_row[i]`` for ``rows[i]``) to their rows."""
        start = 0
        for row, n in zip(rows, per_row):
            if n == 0:
                continue
            have = self._host.get(row, 0)
            if have + n > self.slots.shape[1]:
                raise AssertionError(f"kara recall: row {row} would hold {have + n} evicted slots "
                                     f"(capacity {self.slots.shape[1]})")
            self.slots[row, have:have + n] = slots[start:start + n]
            self._host[row] = have + n
            self.counts[row] = have + n
            start += n
        if start != slots.numel():
            raise AssertionError(f"kara recall: {slots.numel()} evicted slots for {start} counted")

    def set_count(self, row: int, n: int) -> None:
        """The row keeps its first ``n`` slots (the caller moved them there)."""
        if n:
            self._host[row] = n
        else:
            self._host.pop(row, None)
        self.counts[row] = n

    def release(self, row: int) -> torch.Tensor:
        """The row's held slots (to be freed by the caller); the row then holds none."""
        n = self._host.pop(row, 0)
        if n == 0:
            return self.slots.new_empty(0)
        self.counts[row] = 0
        return self.slots[row, :n].clone()


def recall_attention(q: torch.Tensor, select_q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                     resident_table: torch.Tensor, resident_lens: torch.Tensor,
                     evicted_table: torch.Tensor, rows: torch.Tensor, evicted_lens: torch.Tensor,
                     tokens: int, digest: str, sm_scale: float, n_cols: Optional[int] = None,
                     kv: str = "exact") -> torch.Tensor:
    """Decode attention of each request over its resident tokens plus its selected evicted ones.

    Args:
        q, select_q: ``[B, Hq, D]`` the step's queries; the queries that rank (lag 0: ``q``).
        k_buffer, v_buffer: ``[slots, Hkv, D]`` / ``[slots, Hkv, Dv]`` one layer's pool.
        resident_table: ``[rows, columns]`` resident slots per row (SGLang's ``req_to_token``),
            valid below ``resident_lens`` (``[B]``, counting the step's own token).
        evicted_table: ``[rows, capacity]`` held evicted slots per row, valid below
            ``evicted_lens`` (``[B]``); ``rows`` (``[B]``) is each request's row in both tables.
        tokens: R, evicted tokens selected per KV head (all of them if fewer).
        n_cols: an upper bound on ``evicted_lens`` known on the host (default: the table's width).
        kv: the selected tokens' K and V as attended: ``exact``, or ``bitsN`` (rounded per
            token to N bits per group of 32 channels, as a low-precision tier would hold them).
    Returns:
        ``[B, Hq, Dv]`` float32.
    """
    n_cols = evicted_table.shape[1] if n_cols is None else n_cols
    B, Hkv = q.shape[0], k_buffer.shape[1]
    if tokens and n_cols:
        rank = rank_evicted(select_q, k_buffer, evicted_table, rows, evicted_lens, n_cols, bits_of(digest), sm_scale)
        selected = top_columns(rank, evicted_lens, tokens, n_cols, "torch")
    else:
        selected = torch.full((B, Hkv, 0), -1, dtype=torch.int64, device=q.device)
    return recall_decode(q, k_buffer, v_buffer, resident_table, resident_lens, evicted_table, rows,
                         selected, sm_scale, bits_of(kv))


def recall_attention_tier(q: torch.Tensor, select_q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                          resident_table: torch.Tensor, resident_lens: torch.Tensor, tier_layer: Sequence[torch.Tensor],
                          bits: int, tier_table: torch.Tensor, rows: torch.Tensor, tier_lens: torch.Tensor,
                          tokens: int, sm_scale: float, n_cols: Optional[int] = None) -> torch.Tensor:
    """:func:`recall_attention` with the evicted tokens in a low-precision tier
    (kara_sglang/recall_tier.py): ranked by the tier's own keys, attended dequantised.

    ``tier_layer``: one layer's (k_codes, k_lo, k_step, v_codes, v_lo, v_step);
    ``tier_table`` / ``tier_lens``: each row's tier slots and their count.
    """
    n_cols = tier_table.shape[1] if n_cols is None else n_cols
    k_codes, k_lo, k_step, v_codes, v_lo, v_step = tier_layer
    B, Hkv = q.shape[0], k_buffer.shape[1]
    if tokens and n_cols:
        rank = rank_tier(select_q, k_codes, k_lo, k_step, tier_table, rows, tier_lens, n_cols, bits, sm_scale)
        selected = top_columns(rank, tier_lens, tokens, n_cols, "torch")
    else:
        selected = torch.full((B, Hkv, 0), -1, dtype=torch.int64, device=q.device)
    return recall_decode_tier(q, k_buffer, v_buffer, resident_table, resident_lens, k_codes, k_lo, k_step,
                              v_codes, v_lo, v_step, tier_table, rows, selected, bits, sm_scale)


def recall_fill_tier(select_q: torch.Tensor, tier_layer: Sequence[torch.Tensor], bits: int, tier_table: torch.Tensor,
                     rows: torch.Tensor, tier_lens: torch.Tensor, live: torch.Tensor, buffer_slots: torch.Tensor,
                     held: Optional[torch.Tensor], k_buffer: torch.Tensor, v_buffer: torch.Tensor, sm_scale: float,
                     n_cols: int,
                     launch: FillLaunch = FillLaunch(), pages: Optional[Tuple[torch.Tensor, ...]] = None,
                     pages_kept: int = 0, counts: Optional[torch.Tensor] = None) -> None:
    """Recall through SGLang's own attention: rank each request's tier tokens with ``select_q``,
    and write the top R per KV head (R = the buffer's width), dequantised, into the request's
    recall-buffer slots, which its ``req_to_token`` row holds among its resident columns.
    ``held`` (``[rows, Hkv, R]``, kernels/recall_buffer.py): which tier column each buffer
    position holds; then only the picks not held yet are written. ``None``: all R are.

    Only device work with shapes fixed by ``n_cols`` (capture it at the tier row's width and a
    CUDA graph replays it); a request holding fewer than R tier tokens must not be ``live``.
    ``launch``: the ranking's launch and the top-R selection, one stage or two
    (kara_sglang/recall_tune.py).
    ``pages`` (the layer's page table and bounds, kara_sglang/recall_tier.py) with
    ``pages_kept``: two stages, only the tokens of the best ``pages_kept`` pages ranked
    (kernels/recall_pages.py).
    ``counts`` (with ``held``): int64 ``[2]``, the picks and the picks written are added to it.
    """
    tokens = buffer_slots.shape[1]
    if not n_cols or not tokens:
        return
    if pages is not None and pages_kept:
        n_pages = -(-n_cols // PAGE)
        selected = select_two_stage(select_q, tier_layer[:3], tier_table, rows, tier_lens, *pages, n_pages,
                                    pages_kept, tokens, bits, sm_scale, launch.two_stage_select,
                                    launch.second_stage or SECOND_STAGE_LAUNCH)
    else:
        rank = rank_tier(select_q, *tier_layer[:3], tier_table, rows, tier_lens, n_cols, bits, sm_scale,
                         **launch.rank)
        selected = top_columns(rank, tier_lens, tokens, n_cols, launch.select)
    if held is None:
        fill_recall_buffer(selected, tier_table, rows, tier_lens, live, buffer_slots, *tier_layer,
                           k_buffer, v_buffer, bits)
    else:
        refresh_recall_buffer(selected, held, tier_table, rows, tier_lens, live, buffer_slots, *tier_layer,
                              k_buffer, v_buffer, bits, *(launch.writes or ()), counts=counts)
