"""A request's sliding-window (SWA) KV on a hybrid SWA pool, kept in step with Kara's compaction.

SGLang releases the SWA peers of a running request's old entries as its window slides: the
columns ``[swa_dead_lo, cursor)`` of its ``req_to_token`` row have none
(``ReqKvInfo.get_evicted_seqlen(ComponentType.SWA)`` is the cursor,
``mem_cache/common.py: free_swa_out_of_window_slots``), and its pool accounting and radix
insertion read the cursor that way. Columns are KV indices, so Kara keeps four things true:

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

    SGLang 0.5.17 keeps the SWA cursor as ``req.kv.swa_evicted_seqlen``, with no
    ``swa_dead_lo`` floor: the functions here would see no cursor and shift none."""
    from sglang.srt.managers import schedule_batch

    info = getattr(schedule_batch, "ReqKvInfo", None)
    if info is None or not all(hasattr(info, name) for name in
                               ("get_evicted_seqlen", "set_evicted_seqlen", "swa_dead_lo", "clamp_evicted_seqlens")):
        return ("per-request SWA cursor (ReqKvInfo.get_evicted_seqlen, set_evicted_seqlen, swa_dead_lo, "
                "clamp_evicted_seqlens; 0.5.17 keeps req.kv.swa_evicted_seqlen only)")
    return None


def _kv(req: Any) -> Optional[Any]:
    kv = getattr(req, "kv", None)
    return kv if kv is not None and hasattr(kv, "get_evicted_seqlen") else None


def cursor(req: Any) -> int:
    """First column whose SWA peer SGLang has not released (below it, from ``swa_dead_lo``)."""
    kv = _kv(req)
    return kv.get_evicted_seqlen(_swa_component()) if kv is not None else 0


def release_region(req: Any, allocator: Any, req_to_token: torch.Tensor, row: int, region_end: int,
                   region_start: int) -> int:
    """Release the SWA peers of the columns ``[max(cursor, swa_dead_lo), region_end)`` and move
    the cursor to ``region_end``; returns the number released. Call before compressing the
    region ``[region_start, region_end)`` of the request's row (page size 1)."""
    kv = _kv(req)
    if kv is None:
        return 0
    component = _swa_component()
    dead_lo = kv.swa_dead_lo(1)
    if region_start < dead_lo:
        # Entries below swa_dead_lo keep their SWA peers until the request ends (tree-owned
        # or shielded prefill rows): a compaction there would slide live peers under the cursor.
        raise AssertionError(f"kara: compression region starts at {region_start}, below the "
                             f"request's SWA floor {dead_lo}")
    lo = max(kv.get_evicted_seqlen(component), dead_lo)
    if lo < region_end:
        allocator.free_swa(req_to_token[row, lo:region_end].to(torch.int64))
    kv.set_evicted_seqlen(component, max(lo, region_end))
    return max(0, region_end - lo)


def shift(req: Any, n_evicted: int) -> None:
    """The request's row lost ``n_evicted`` entries, all below the cursor."""
    kv = _kv(req)
    if kv is None or _swa_component() not in kv.component_evicted_seqlens:
        return
    component = _swa_component()
    kv.set_evicted_seqlen(component, kv.get_evicted_seqlen(component) - n_evicted)


def clamp(req: Any, length: int) -> None:
    """The request's row was cut to ``length`` entries."""
    kv = _kv(req)
    if kv is not None:
        kv.clamp_evicted_seqlens(length)


def check_row(req: Any, allocator: Any, req_to_token: torch.Tensor, row: int, sliding_window: int) -> None:
    """Debug (``KARA_DEBUG_CHECKS``), after a compaction: the columns ``[swa_dead_lo, cursor)``
    of the request's row hold no SWA peer, every column from the cursor to the row's end holds
    one, and the cursor is no later than the window's start (the newest ``sliding_window + 1``
    entries, the step's own included, keep their peers). A cursor not shifted back leaves live
    peers below it; SGLang's eviction on a token-space frontier releases peers in the window."""
    from kara_sglang import req_kv

    kv = _kv(req)
    if kv is None:
        return
    length, lo, cur = req_kv.committed_len(req), kv.swa_dead_lo(1), cursor(req)
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
