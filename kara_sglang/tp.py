"""Tensor parallelism: one keep set for every rank of a tensor-parallel group.

Under ``--tp-size N`` each rank holds ``1/N`` of the query and KV heads and its own copy of
``req_to_token`` and of the allocator's free list; the ranks stay in step only because every
rank runs the same allocations and frees in the same order. The scorer sees only this rank's
heads, so its per-token scores differ between ranks, and a keep set chosen from them would
differ too: the ranks would free different slots, their ``req_to_token`` rows would name
different tokens, and the next step's attention would mix KV of different tokens across
heads. :class:`ScoreReducer` sums the scores over the group before selection (one float32
all-reduce per compression step, batched over every window of the step), so every rank sees
the full-head score (the same sum a single GPU would compute, up to float32 rounding) and,
the selection being a deterministic function of it, picks the same tokens.

Query heads are never replicated across ranks (KV heads may be, when ``N`` exceeds their
number), and scores sum over query heads, so the reduced score counts every head once.

The group is SGLang's *attention* TP group: without DP attention it is the TP group; with DP
attention it is the ranks that share one replica's requests.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, List, Optional

import torch


class ScoreReducer:
    """Sums per-token scores over a process group, in place; counts what that costs.

    ``group`` is a ``torch.distributed`` process group (NCCL on GPUs, gloo on the CPU) and
    ``cpu_group`` a gloo group over the same ranks for the debug cross-checks.
    """

    def __init__(self, group: Any, cpu_group: Any, world_size: int, rank: int) -> None:
        self.group, self.cpu_group = group, cpu_group
        self.world_size, self.rank = world_size, rank
        self.calls = 0
        self.bytes = 0
        self.host_seconds = 0.0  # enqueue (GPU) or whole collective (CPU) time

    def __call__(self, flat: torch.Tensor) -> None:
        """All-reduce ``flat`` (1-D float32) with SUM, in place."""
        start = time.perf_counter()
        torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=self.group)
        self.host_seconds += time.perf_counter() - start
        self.calls += 1
        self.bytes += flat.numel() * flat.element_size()

    def check_same(self, what: str, *tensors: torch.Tensor) -> None:
        """Debug: raise on every rank if ``tensors`` differ between ranks (a digest is compared)."""
        digest = hashlib.sha256()
        for t in tensors:
            digest.update(t.detach().to("cpu").contiguous().numpy().tobytes())
        everyone = self.gather(digest.hexdigest())
        if len(set(everyone)) != 1:
            raise AssertionError(f"kara: tensor-parallel ranks diverged on {what} "
                                 f"(rank {self.rank}; digests {everyone})")

    def gather(self, obj: Any) -> List[Any]:
        """Every rank's ``obj``, in rank order (a collective: every rank must call it)."""
        everyone: List[Optional[Any]] = [None] * self.world_size
        torch.distributed.all_gather_object(everyone, obj, group=self.cpu_group)
        return everyone

    def counters(self) -> dict:
        return {"tp_size": self.world_size, "score_allreduces": self.calls,
                "score_allreduce_bytes": self.bytes,
                "score_allreduce_host_s": round(self.host_seconds, 6)}


def reducer_for(model_runner: Any) -> Optional[ScoreReducer]:
    """The reducer of this scheduler's attention TP group, or ``None`` on a single rank."""
    try:
        from sglang.srt.distributed.parallel_state import get_attn_tp_group
    except ImportError:  # pragma: no cover - not under SGLang
        return None
    if not torch.distributed.is_initialized():
        return None
    group = get_attn_tp_group()
    if group.world_size == 1:
        return None
    return ScoreReducer(group.device_group, group.cpu_group, group.world_size, group.rank_in_group)


def digest_state(req_to_token: torch.Tensor, allocator: Any) -> str:
    """Digest of a rank's whole ``req_to_token`` table and its allocator's free list, in order.

    Ranks that ran the same allocations and frees in the same order have equal digests; the
    free list's order matters because it decides which slots the next allocation gets.
    """
    digest = hashlib.sha256(req_to_token.detach().to("cpu").contiguous().numpy().tobytes())
    for name in ("free_pages", "release_pages"):
        pages = getattr(allocator, name, None)
        if isinstance(pages, torch.Tensor):
            digest.update(name.encode())
            digest.update(pages.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return digest.hexdigest()
