"""The interface every KV policy implements.

A policy answers two questions: *when* a request's decode region is compressed and which
region (:meth:`KVPolicy.plan`), and *which tokens* of that region survive
(:meth:`KVPolicy.select`). Scoring, compaction and SGLang bookkeeping are shared and live
elsewhere, so a policy stays one short file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch

from kara_sglang.config import KaraConfig
from kara_sglang.window import CompressionTask, WindowState


class KVPolicy(ABC):
    """Decides when and what to compress for one configuration."""

    name: str = ""
    # Which kernel turns captured queries into scores: "window" = the bidirectional window
    # scorer (kernels/scorer.py), "current_query" = the current query's attention
    # contributions over the whole KV (kernels/longflow.py).
    importance: str = "window"

    def __init__(self, config: KaraConfig) -> None:
        self.config = config

    @property
    def query_ring(self) -> int:
        """Queries captured per request (the newest ones); 0 if the policy needs no scores."""
        return 0

    @property
    def query_heads(self) -> str:
        """How captured queries are stored: ``"group"`` (mean per KV head) or ``"all"`` heads."""
        return self.config.vote_heads

    @abstractmethod
    def plan(self, state: WindowState) -> Optional[CompressionTask]:
        """The compression due for this request now, or ``None``."""

    def steps_until_due(self, state: WindowState) -> int:
        """Decode steps after which :meth:`plan` may first return a task (at least 1)."""
        return 1

    def max_growth(self, state: WindowState, remaining: int) -> int:
        """Most KV entries the request can still add in ``remaining`` more decode steps."""
        return remaining

    def tail_consumed(self, task: CompressionTask) -> int:
        """Tail tokens that become final (never rescored) once ``task`` is applied."""
        return 0

    def select(self, scores: Optional[torch.Tensor], task: CompressionTask, n_windows: int,
               device: torch.device) -> torch.Tensor:
        """Keep set for ``n_windows`` regions of ``task``'s shape.

        Args:
            scores: ``[n_windows, task.n_keys]`` float importance (higher = keep), or
                ``None`` when ``query_ring == 0``.

        Returns:
            ``[n_windows, task.keep]`` int64 positions within the region, ascending.
        """
        raise NotImplementedError

    def select_and_merge(self, scores: Optional[torch.Tensor], task: CompressionTask, n_windows: int,
                         device: torch.device):
        """Keep set, plus the merges that fill some kept slots (``None``: plain eviction).

        Policies that consolidate KV (cask) override this; the others only select.
        """
        return self.select(scores, task, n_windows, device), None


class NoCompression(KVPolicy):
    """``--kv-policy none``: vanilla SGLang, nothing is ever compressed."""

    name = "none"

    def plan(self, state: WindowState) -> Optional[CompressionTask]:
        return None

    def steps_until_due(self, state: WindowState) -> int:
        return 1 << 62


class DecodeCacheBudgetPolicy(KVPolicy):
    """Base of the policies that cut the whole decode cache back to a budget.

    They fire when the decode cache reaches ``budget + U`` tokens, so it never holds more.
    """

    @property
    def cache_cap(self) -> int:
        return self.config.window_budget + self.config.buffer

    def is_due(self, state: WindowState) -> bool:
        return state.decode_kv >= self.cache_cap

    def steps_until_due(self, state: WindowState) -> int:
        return max(1, self.cache_cap - state.decode_kv)

    def max_growth(self, state: WindowState, remaining: int) -> int:
        return min(remaining, max(0, self.cache_cap - state.decode_kv))
