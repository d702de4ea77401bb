"""One compression step for a batch of requests: score, select, compact, free.

Engine-independent: it sees SGLang's ``req_to_token`` table and per-layer K/V buffers as
plain tensors, so the SGLang adapter only has to collect due requests and hand back the
freed slots. Every step is batched over the requests whose tasks share a shape and runs
on the tensors' device without a host sync (index lists are built on the host from the
window bookkeeping, which the host already knows, and copied asynchronously).

Page size 1: kept tokens stay in their slots; only the request's ``req_to_token`` row is
rewritten and the evicted slots are returned.
Page size P > 1: the kept tokens (and the tokens after the region) are copied left into
the slots their new positions already own, so ``slot % P == position % P`` keeps holding,
and the pages wholly past the new end are returned.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from kara_kernels import compact_kv, longflow_decode, merge_kv, window_scores
from kara_sglang.fp8_kv import dequantized_window_keys
from kara_sglang.policies.base import KVPolicy
from kara_sglang.query_buffer import QueryBuffer
from kara_sglang.window import CompressionTask


@dataclass
class KVLayout:
    """The parts of a KV pool that compression reads and writes.

    Attributes:
        req_to_token: ``[pool_rows, max_context]`` int slot of each request's i-th KV entry.
        k_buffers, v_buffers: one ``[num_slots, kv_heads, head_dim]`` tensor per layer.
        page_size: allocator page size (1 = token granularity).
    """

    req_to_token: torch.Tensor
    k_buffers: Sequence[torch.Tensor]
    v_buffers: Sequence[torch.Tensor]
    page_size: int = 1
    # FP8 caches (kara_sglang/fp8_kv.py): the buffers hold bytes of this float8 type, each
    # layer's keys scaled by k_scales[layer]. None: the buffers hold the real values.
    fp8_dtype: Optional[torch.dtype] = None
    k_scales: Optional[Sequence[float]] = None
    # MLA pools (kara_sglang/kv_pool.py): each V buffer is a view of its K buffer's rows (the
    # latent's first kv_lora_rank channels), so a row moves once, with the K buffers.
    values_in_keys: bool = False

    @property
    def row_buffers(self) -> list:
        """Every buffer whose rows compaction and merging move."""
        return list(self.k_buffers) + ([] if self.values_in_keys else list(self.v_buffers))


@dataclass(frozen=True)
class DueRequest:
    """A request with a compression due: its ``req_to_token`` row, query-buffer row, task.

    ``first``: the request's first compression (no exact-prefix length recorded yet).
    """

    pool_row: int
    query_row: int
    task: CompressionTask
    first: bool = False


@dataclass
class CompressionStats:
    """Running totals; ``score_seconds`` is only measured when profiling (it syncs the GPU)."""

    events: int = 0
    tokens_evicted: int = 0
    score_seconds: float = 0.0


def page_ceil(position: int, page_size: int) -> int:
    """The first page boundary at or after ``position``: where whole free pages can start."""
    return -(-position // page_size) * page_size


def to_device(values, device: torch.device) -> torch.Tensor:
    """Host ints (a list or a CPU tensor) on ``device`` without blocking the host.

    A plain copy from pageable memory waits for the stream's earlier work; under overlap
    scheduling that is the forward step in flight, so the scheduler would lose the overlap.
    """
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.int64)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


@dataclass
class _Group:
    """Due requests of one task shape under one policy, with their old slots (and scores)."""

    items: List[DueRequest]
    policy: KVPolicy
    rows: torch.Tensor
    columns: torch.Tensor
    old: torch.Tensor  # [n, span] slots before compression
    scores: Optional[torch.Tensor] = None  # [n, n_keys] float32, reduced over TP

    @property
    def task(self) -> CompressionTask:
        return self.items[0].task


class Compressor:
    """Runs a policy's compressions on a KV layout."""

    def __init__(self, policy: KVPolicy, layout: KVLayout, queries: Optional[QueryBuffer],
                 sm_scale: float, profile: bool = False) -> None:
        if policy.query_ring and queries is None:
            raise ValueError(f"policy {policy.name!r} scores tokens and needs a query buffer")
        self.policy = policy
        self.layout = layout
        self.queries = queries
        self.sm_scale = sm_scale
        self.profile = profile
        self.stats = CompressionStats()
        # Tensor parallelism (see kara_sglang.tp): sums the step's scores over the ranks'
        # heads in place, and (debug) checks that every rank chose the same keep set.
        self.reduce_scores: Optional[Callable[[torch.Tensor], None]] = None
        self.check_keep: Optional[Callable[[torch.Tensor], None]] = None
        # Evaluation (kara_sglang.kept_positions): told each group's keep set.
        self.on_keep: Optional[Callable[[List[DueRequest], torch.Tensor], None]] = None
        # Page size 1: (req_to_token row, slots) of each request, in the order of the slots
        # the last run returned (recall holds them per row instead of freeing them).
        self.freed_order: List[Tuple[int, int]] = []
        # Tasks with a recall buffer: (req_to_token rows, ``[n, R]`` slots of the evicted
        # tokens whose slots became the buffer), per group of the last run.
        self.recall_buffers: List[Tuple[List[int], torch.Tensor]] = []

    def run(self, due: Sequence[DueRequest], policy: Optional[KVPolicy] = None,
            exact_prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Compress every due request; returns the 1-D int64 slots to give back to the allocator.

        ``policy`` overrides the compressor's own for this call (per-request settings); it
        must use the same query ring. ``exact_prefix`` (int64, one entry per ``req_to_token``
        row) is kept at the length of each compressed request's exact prefix: the columns
        that still hold token j's own KV at column j (everything before the region, then the
        region's leading tokens kept in place and not merged into). Written on the device,
        read only when the request is released.
        """
        return self.run_batches([(due, policy or self.policy)], exact_prefix)

    def run_batches(self, batches: Sequence[Tuple[Sequence[DueRequest], KVPolicy]],
                    exact_prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Compress several batches, each under its own policy, as ONE step.

        Every window of the step is scored first, then ``reduce_scores`` (tensor parallelism:
        a sum over the ranks' heads) runs once over all of them, then each group selects and
        compacts. Groups run in the order of ``batches`` and of each batch's requests, which
        every rank of a TP group sees identically.
        """
        device = self.layout.req_to_token.device
        self.freed_order = []
        self.recall_buffers = []
        groups: List[_Group] = []
        for due, policy in batches:
            by_shape: Dict[tuple, List[DueRequest]] = {}
            for item in due:
                by_shape.setdefault(item.task.shape, []).append(item)
            groups += [self._gather(items, policy, device) for items in by_shape.values()]
        self._score(groups, device)
        freed = [self._select_and_compact(g, device, exact_prefix) for g in groups]
        for due, _ in batches:
            self.stats.events += len(due)
            self.stats.tokens_evicted += sum(item.task.n_evicted for item in due)
        if not freed:
            return torch.empty(0, dtype=torch.int64, device=device)
        return torch.cat(freed)

    def _gather(self, items: List[DueRequest], policy: KVPolicy, device: torch.device) -> "_Group":
        task = items[0].task
        span = task.n_keys + task.n_suffix
        rows = to_device([it.pool_row for it in items], device)
        starts = to_device([it.task.kv_start for it in items], device)
        columns = starts[:, None] + torch.arange(span, device=device)
        old = self.layout.req_to_token[rows[:, None], columns].long()  # [n, span]
        return _Group(items, policy, rows, columns, old)

    def _score(self, groups: List["_Group"], device: torch.device) -> None:
        """Scores of every scoring group, in views of one buffer, reduced over TP in one call."""
        scoring = [g for g in groups if g.policy.query_ring]
        if not scoring:
            return
        sizes = [len(g.items) * g.task.n_keys for g in scoring]
        flat = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
        start = self._clock(device)
        for g, view in zip(scoring, flat.split(sizes)):
            query_rows = to_device([it.query_row for it in g.items], device)
            out = view.view(len(g.items), g.task.n_keys)
            if g.policy.importance == "current_query":
                out.copy_(self._current_query_scores(g.items, query_rows, g.rows, g.columns[:, 0],
                                                     g.task, device))
                g.scores = out
            else:
                k_buffers, slots = self.queries.k_buffers_of(self.layout.k_buffers), g.old[:, : g.task.n_keys]
                if self.layout.fp8_dtype is not None:
                    scales = self.queries.buffers_of(self.layout.k_scales)
                    k_buffers, slots = dequantized_window_keys(k_buffers, scales, slots, self.layout.fp8_dtype,
                                                               self.queries.data.dtype)
                g.scores = window_scores(self.queries.data, query_rows, k_buffers, slots, self.sm_scale, out=out)
        if self.profile:
            self.stats.score_seconds += self._clock(device) - start
        if self.reduce_scores is not None:
            self.reduce_scores(flat)

    def _select_and_compact(self, g: "_Group", device: torch.device,
                            exact_prefix: Optional[torch.Tensor]) -> torch.Tensor:
        task, n, old, rows, columns = g.task, len(g.items), g.old, g.rows, g.columns
        span = task.n_keys + task.n_suffix
        R = task.recall_buffer
        chosen = dataclasses.replace(task, keep=task.policy_keep, recall_buffer=0) if R else task
        keep, merges = g.policy.select_and_merge(g.scores, chosen, n, device)  # keep: [n, policy_keep]
        if self.check_keep is not None:
            self.check_keep(keep)
        if self.on_keep is not None:
            self.on_keep(g.items, keep)
        if merges is not None:
            # Policies that merge (cask): merged rows go into slots of the keep set first, so
            # the compaction below moves them like any kept row (merge reads only its own
            # disjoint group's slots; compaction reads each kept slot after its merge).
            self._merge(old, merges, n)
        if exact_prefix is not None:
            self._record_exact_prefix(g.items, rows, columns[:, 0], keep, merges, span, exact_prefix)
        suffix = torch.arange(task.n_keys, span, device=device).expand(n, -1)
        if R:
            if self.layout.page_size != 1:
                raise ValueError("a recall buffer needs page size 1")
            # The first R evicted positions fill the buffer's columns, after the kept ones:
            # their slots stay with the row (the exact prefix above ends before them).
            chosen_mask = torch.zeros(n, task.n_keys, dtype=torch.bool, device=device).scatter_(1, keep, True)
            buffer = chosen_mask.to(torch.int8).argsort(dim=1, stable=True)[:, :R]
            self.recall_buffers.append(([it.pool_row for it in g.items], old.gather(1, buffer)))
            keep = torch.cat([keep, buffer], dim=1)
        order = torch.cat([keep, suffix], dim=1)  # [n, keep + n_suffix], ascending but the buffer
        moved = old.gather(1, order)
        new_len = task.keep + task.n_suffix

        if self.layout.page_size == 1:
            self.layout.req_to_token[rows[:, None], columns[:, :new_len]] = moved.to(
                self.layout.req_to_token.dtype)
            kept = torch.zeros_like(old, dtype=torch.bool).scatter_(1, order, True)
            # Stable sort puts the not-kept positions first, in order: exactly n_evicted per row.
            evicted_pos = kept.to(torch.int8).argsort(dim=1, stable=True)[:, : task.n_evicted]
            self.freed_order += [(it.pool_row, task.n_evicted) for it in g.items]
            return old.gather(1, evicted_pos).reshape(-1)

        n_moves = torch.full((n,), new_len, dtype=torch.int32, device=device)
        compact_kv(self.layout.row_buffers, moved, old[:, :new_len], n_moves)
        return self._whole_pages_past_end(g.items, device)

    @staticmethod
    def _record_exact_prefix(items, rows, starts, keep, merges, span, exact_prefix) -> None:
        in_place = keep == torch.arange(keep.shape[1], device=keep.device)  # [n, keep]
        if merges is not None:  # a merged entry is no longer its token's own KV
            target = torch.zeros(keep.shape[0], span, dtype=torch.bool, device=keep.device)
            target.scatter_(1, merges.targets, True)
            in_place &= ~target.gather(1, keep)
        leading = in_place.to(torch.int64).cumprod(dim=1).sum(dim=1)
        # Columns before the region are untouched, so a later compression can only shorten
        # the prefix (policies that re-compress their whole decode cache, e.g. threshold).
        first = to_device([it.first for it in items], keep.device).bool()
        known = torch.where(first, torch.iinfo(torch.int64).max, exact_prefix[rows])
        exact_prefix[rows] = torch.minimum(known, starts + leading)

    def _current_query_scores(self, items: List[DueRequest], query_rows: torch.Tensor, rows: torch.Tensor,
                              starts: torch.Tensor, task: CompressionTask,
                              device: torch.device) -> torch.Tensor:
        """Importance of the region's tokens under each request's latest query (LongFlow).

        The softmax runs over the request's whole KV (``old_end`` entries, prompt included),
        as the model's attention did; only the region's tokens are scored. SGLang's backend
        already produced this step's attention output, so the kernel's output is off.
        """
        if self.queries.ring != 1:
            raise ValueError("current-query importance needs a query ring of 1 (the current query)")
        kv_lens = to_device([it.task.old_end for it in items], device)
        _, scores = longflow_decode(
            self.queries.data[:, :, 0], query_rows,
            self.queries.buffers_of(self.layout.k_buffers), self.queries.buffers_of(self.layout.v_buffers),
            self.layout.req_to_token, rows, kv_lens, self.sm_scale,
            score_start=starts, n_scores=task.n_keys, with_output=False,
        )
        return scores

    def _merge(self, old: torch.Tensor, merges, n: int) -> None:
        """Write each merged entry (weighted sum of its members' K/V rows) into its target slot."""
        n_runs, longest = merges.members.shape[1:]
        dst = old.gather(1, merges.targets).reshape(-1)
        src = old.gather(1, merges.members.reshape(n, -1)).reshape(n * n_runs, longest).contiguous()
        merge_kv(self.layout.row_buffers, dst, src,
                 merges.weights.reshape(n * n_runs, longest).contiguous(),
                 merges.sizes.expand(n, -1).reshape(-1))

    def _clock(self, device: torch.device) -> float:
        if self.profile and device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def _whole_pages_past_end(self, items: List[DueRequest], device: torch.device) -> torch.Tensor:
        """Slots of positions from the first page boundary at or after each new end to the old end.

        The allocator frees by page, so naming these slots frees exactly the pages that lie
        wholly past the new end (including the unused rest of the old last page).
        """
        page = self.layout.page_size
        pool_rows: List[int] = []
        positions: List[int] = []
        for it in items:
            first = page_ceil(it.task.new_end, page)
            for pos in range(first, it.task.old_end):
                pool_rows.append(it.pool_row)
                positions.append(pos)
        if not positions:
            return torch.empty(0, dtype=torch.int64, device=device)
        return self.layout.req_to_token[
            to_device(pool_rows, device), to_device(positions, device)].long()
