"""A request's sliding-window (SWA) KV on a hybrid SWA pool, kept in step with Kara's compaction.

SGLang releases the SWA peers of a running request's old entries as its window slides: the
columns ``[swa_dead_lo, cursor)`` of its ``req_to_token`` row have none
(``ReqKvInfo.get_evicted_seqlen(ComponentType.SWA)`` is the cursor, ``req.kv.swa_evicted_seqlen``
on SGLang 0.5.17: :class:`_Cursor` reads either; ``mem_cache/common.py:
free_swa_out_of_window_slots``), and its pool accounting and radix insertion read the cursor
that way. Columns are KV indices, so Kara keeps four things true:

- **Before a compression** the region's entries still holding an SWA peer give it up
  (:func:`release_region`): the region is older than the uncompressed tail, which covers the
  sliding window (``kv_pool.check_supported``), so no SWA layer reads them again. The cursor
  moves to the region's end; every evicted entry then has no SWA peer, and the allocator
  frees only its full slot (``kv_pool.free_slots``).
- **After it** the cursor moves left by the entries evicted (:func:`shift`): the survivors
  below it slid left together, order kept, so ``[swa_dead_lo, cursor)`` again names exactly
  the entries without a peer.
- **SGLang's own window eviction** reads the request's length in token space
  (``Req.seqlen - 1``, ``ScheduleBatch.maybe_evict_swa``); the KV row is shorter by the
  evicted count, which ``kara_patches.swa_eviction`` takes off (:func:`kv_frontier`).
- **A row cut at release** (Kara hands the radix tree only the exact prefix) clamps the cursor
  to the new length (:func:`clamp`), as SGLang's streaming sessions do.

Nothing here runs on pools without SWA layers (every call is a no-op there).
"""

from __future__ import annotations

from typing import Any, Optional

import torch


def _swa_component() -> Any:
    from sglang.srt.mem_cache.unified_cache.component_type import ComponentType

    return ComponentType.SWA


def missing() -> Optional[str]:
    """What this SGLang release lacks for Kara on a hybrid SWA pool (``None``: nothing).

    Both supported ends keep a per-request cursor (see :class:`_Cursor`); kept for the
    start-up check (``kv_pool._check_swa``) should a release drop both forms."""
    from sglang.srt.managers import schedule_batch

    info = getattr(schedule_batch, "ReqKvInfo", None)
    if info is None:
        return "per-request SWA cursor (ReqKvInfo)"
    if all(hasattr(info, name) for name in
           ("get_evicted_seqlen", "set_evicted_seqlen", "swa_dead_lo", "clamp_evicted_seqlens")):
        return None
    if "swa_evicted_seqlen" in getattr(info, "__dataclass_fields__", {}) or hasattr(info, "swa_evicted_seqlen"):
        return None
    return ("per-request SWA cursor (ReqKvInfo.get_evicted_seqlen / set_evicted_seqlen / swa_dead_lo, "
            "or 0.5.17's ReqKvInfo.swa_evicted_seqlen)")


class _Cursor:
    """The one place the SGLang releases differ here: the request's SWA cursor and its floor.

    0.5.23: ``req.kv`` (``ReqKvInfo``, never ``None``) keeps the cursor per component
    (``get_evicted_seqlen(ComponentType.SWA)``; absent on pools without SWA layers) and the
    floor (``swa_dead_lo(page_size)``). 0.5.17: ``req.kv`` is ``None`` while nothing is held;
    the cursor is ``req.kv.swa_evicted_seqlen`` (0 on pools without SWA layers, which never
    move it) and the floor is computed inline by ``mem_cache/common.py:
    free_swa_out_of_window_slots`` as ``max(req.cache_protected_len, req.swa_evict_floor)``
    (rounded up to a page there; Kara's SWA support is page size 1): the same quantity."""

    def __init__(self, req: Any, kv: Any) -> None:
        self.req, self.kv = req, kv
        self.new = hasattr(kv, "get_evicted_seqlen")

    def get(self) -> int:
        return self.kv.get_evicted_seqlen(_swa_component()) if self.new else int(self.kv.swa_evicted_seqlen)

    def set(self, value: int) -> None:
        if self.new:
            self.kv.set_evicted_seqlen(_swa_component(), value)
        else:
            self.kv.swa_evicted_seqlen = value

    def tracked(self) -> bool:
        """Whether the pool has SWA layers whose cursor this request carries."""
        return _swa_component() in self.kv.component_evicted_seqlens if self.new else self.get() > 0

    def dead_lo(self) -> int:
        """The floor at page size 1, the only one Kara runs on SWA pools (no page rounding)."""
        if self.new:
            return self.kv.swa_dead_lo(1)
        return max(int(getattr(self.req, "cache_protected_len", 0) or 0),
                   int(getattr(self.req, "swa_evict_floor", 0) or 0))

    def clamp(self, length: int) -> None:
        if self.new:
            self.kv.clamp_evicted_seqlens(length)
        else:
            self.kv.swa_evicted_seqlen = min(self.kv.swa_evicted_seqlen, length)


def _cur(req: Any) -> Optional[_Cursor]:
    kv = getattr(req, "kv", None)
    if kv is None or not (hasattr(kv, "get_evicted_seqlen") or hasattr(kv, "swa_evicted_seqlen")):
        return None
    return _Cursor(req, kv)


def cursor(req: Any) -> int:
    """First column whose SWA peer SGLang has not released (below it, from ``swa_dead_lo``)."""
    c = _cur(req)
    return c.get() if c is not None else 0


def dead_lo(req: Any) -> int:
    """The lowest column whose SWA peer the request may release itself (``swa_dead_lo``)."""
    c = _cur(req)
    return c.dead_lo() if c is not None else 0


def release_region(req: Any, allocator: Any, req_to_token: torch.Tensor, row: int, region_end: int,
                   region_start: int) -> int:
    """Release the SWA peers of the columns ``[max(cursor, swa_dead_lo), region_end)`` and move
    the cursor to ``region_end``; returns the number released. Call before compressing the
    region ``[region_start, region_end)`` of the request's row (page size 1)."""
    c = _cur(req)
    if c is None:
        return 0
    dead_lo = c.dead_lo()
    if region_start < dead_lo:
        # Entries below swa_dead_lo keep their SWA peers until the request ends (tree-owned
        # or shielded prefill rows): a compaction there would slide live peers under the cursor.
        raise AssertionError(f"kara: compression region starts at {region_start}, below the "
                             f"request's SWA floor {dead_lo}")
    lo = max(c.get(), dead_lo)
    if lo < region_end:
        allocator.free_swa(req_to_token[row, lo:region_end].to(torch.int64))
    c.set(max(lo, region_end))
    return max(0, region_end - lo)


def shift(req: Any, n_evicted: int) -> None:
    """The request's row lost ``n_evicted`` entries, all below the cursor."""
    c = _cur(req)
    if c is None or not c.tracked():
        return
    c.set(c.get() - n_evicted)


def clamp(req: Any, length: int) -> None:
    """The request's row was cut to ``length`` entries."""
    c = _cur(req)
    if c is not None:
        c.clamp(length)


def check_row(req: Any, allocator: Any, req_to_token: torch.Tensor, row: int, sliding_window: int) -> None:
    """Debug (``KARA_DEBUG_CHECKS``), after a compaction: the columns ``[swa_dead_lo, cursor)``
    of the request's row hold no SWA peer, every column from the cursor to the row's end holds
    one, and the cursor is no later than the window's start (the newest ``sliding_window + 1``
    entries, the step's own included, keep their peers). A cursor not shifted back leaves live
    peers below it; SGLang's eviction on a token-space frontier releases peers in the window."""
    from kara_sglang import req_kv

    c = _cur(req)
    if c is None:
        return
    length, lo, cur = req_kv.committed_len(req), c.dead_lo(), c.get()
    mapping = allocator.full_to_swa_index_mapping
    peers = mapping[req_to_token[row, :length].to(torch.int64).to(mapping.device)] > 0
    if cur > length - sliding_window - 1:
        raise AssertionError(f"kara: SWA cursor {cur} inside the sliding window (row of {length} entries, "
                             f"window {sliding_window} + 1)")
    if bool(peers[lo:cur].any()) or not bool(peers[cur:].all()):
        raise AssertionError(f"kara: SWA peers out of step with the cursor {cur} (floor {lo}, row of "
                             f"{length} entries): below it {peers[lo:cur].tolist()}, from it {peers[cur:].tolist()}")


def kv_frontier(req: Any, pre_len: int) -> int:
    """SGLang's token-space frontier for window eviction, as a column of the request's row."""
    return pre_len - getattr(req, "kara_offset", 0)
