"""Retraction on a PD decode server: a request leaves and comes back with its Kara state.

A decode server (``--disaggregation-mode decode``) cannot re-prefill a retracted request:
SGLang copies its KV to the host (``Req.offload_kv_cache``), frees its slots, and later
allocates ``prompt + output - 1`` slots again and copies the KV back (``load_kv_cache``).
For a request Kara compressed, that length is ``evicted`` tokens too long, and its row is a
compacted one, so SGLang's copy would bring back garbage past the kept tokens. Here every
request Kara tracks keeps its state across the retraction (and goes on compressing where it
stopped): only its kept KV goes to the host, the re-allocation is for exactly that many
tokens, and its per-row state (evicted count, exact prefix, the tail's captured queries)
moves to the row it gets on resume.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from kara_sglang import req_kv
from kara_sglang.adapter import shrink_seq_lens


@dataclass
class OffloadedRow:
    """A tracked request's per-row device state while it is retracted (host copies)."""

    kv_len: int
    evicted: int
    exact_prefix: int
    queries: Optional[torch.Tensor]  # its query-ring row
    ring_pos: int


def tracked(req: Any) -> bool:
    """Has Kara started tracking ``req`` (its first decode step ran)?"""
    return getattr(req, "kara", None) is not None


def offload(runtime: Any, req: Any, allocator: Any) -> None:
    """Copy the kept KV and the row state of tracked ``req`` to the host (before release)."""
    row, kv_len = req_kv.pool_row(req), req_kv.committed_len(req)
    slots = runtime.req_to_token_pool.req_to_token[row, :kv_len]
    req.kv_cache_cpu = allocator.get_cpu_copy(slots, mamba_indices=req.mamba_pool_idx)
    queries = runtime.queries.data[row].to("cpu", copy=True) if runtime.queries is not None else None
    req.kara_offloaded = OffloadedRow(
        kv_len=kv_len, evicted=req.kara.window.evicted,
        exact_prefix=int(runtime.exact_prefix_by_row[row].item()), queries=queries,
        ring_pos=int(runtime.ring_pos[row].item()) if runtime.queries is not None else 0)


def fill_len(req: Any, full_len: int) -> int:
    """Slots a resumed request needs: SGLang's full length less what Kara had evicted."""
    saved: Optional[OffloadedRow] = getattr(req, "kara_offloaded", None)
    return full_len if saved is None else full_len - saved.evicted


def restore(runtime: Any, req: Any, allocator: Any) -> None:
    """Copy the kept KV back into the resumed request's new row and restore its row state."""
    saved: OffloadedRow = req.kara_offloaded
    row = req_kv.pool_row(req)
    if req_kv.committed_len(req) != saved.kv_len:
        raise AssertionError(f"kara: request {req.rid} resumed with {req_kv.committed_len(req)} KV slots, "
                             f"{saved.kv_len} were offloaded")
    slots = runtime.req_to_token_pool.req_to_token[row, :saved.kv_len]
    allocator.load_cpu_copy(req.kv_cache_cpu, slots, mamba_indices=req.mamba_pool_idx)
    del req.kv_cache_cpu
    runtime.exact_prefix_by_row[row] = saved.exact_prefix
    if saved.queries is not None:
        runtime.queries.data[row] = saved.queries.to(runtime.queries.data.device)
        runtime.ring_pos[row] = saved.ring_pos
    runtime.set_offset(req, row, saved.evicted)
    req.kara_offloaded = None


def fix_prebuilt_lengths(batch: Any) -> None:
    """The prebuilt batch's sequence lengths, less each resumed compressed request's evictions."""
    delta = torch.tensor([req.kara.window.evicted if tracked(req) else 0 for req in batch.reqs],
                         dtype=torch.int64)
    if bool(delta.any()):
        shrink_seq_lens(batch, delta)
