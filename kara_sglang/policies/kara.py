"""Kara: sliding-window compression of the decode tail with bidirectional scoring.

When the uncompressed tail holds ``W + U`` tokens, its oldest ``W`` are scored by all
``W + U`` tail queries (softmax over the ``W`` window keys, no causal mask) and shrunk by
Token2Chunk to the budget; the newest ``U`` stay and open the next window. Compressed
windows are final and the prompt is never touched.
"""

from __future__ import annotations

from typing import Optional

import torch

from kara_sglang.policies.base import KVPolicy
from kara_sglang.token2chunk import token2chunk
from kara_sglang.window import CompressionTask, WindowState


class KaraPolicy(KVPolicy):
    name = "kara"

    @property
    def query_ring(self) -> int:
        return self.config.window + self.config.buffer

    def plan(self, state: WindowState) -> Optional[CompressionTask]:
        cfg = self.config
        if state.tail < cfg.window + cfg.buffer:
            return None
        return CompressionTask(
            kv_start=state.kv_len - state.tail,
            n_keys=cfg.window,
            keep=cfg.window_budget,
            n_suffix=state.tail - cfg.window,
            n_queries=self.query_ring,
        )

    def steps_until_due(self, state: WindowState) -> int:
        return max(1, self.config.window + self.config.buffer - state.tail)

    def max_growth(self, state: WindowState, remaining: int) -> int:
        # Each W decoded tokens leave `budget` behind, plus at most one uncompressed tail.
        cfg = self.config
        windows = -(-remaining // cfg.window)
        return min(remaining, windows * cfg.window_budget + cfg.window + cfg.buffer)

    def tail_consumed(self, task: CompressionTask) -> int:
        return task.n_keys

    def select(self, scores, task, n_windows, device) -> torch.Tensor:
        return token2chunk(scores, task.keep, self.config.chunk_size, self.config.num_chunks)
