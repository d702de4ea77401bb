"""Threshold-triggered baseline in the style of SnapKV / R-KV, applied while decoding.

When the whole decode region reaches ``budget + U`` tokens, its newest ``U`` tokens act as
the observation window: their queries score every older decode token, the best
``budget - U`` survive (plain top-k, already-compressed tokens are rescored), and the
observation window itself is kept. The region then holds ``budget`` tokens again, so this
fires every ``U`` decode steps: the recurring cost the Kara paper criticises. (R-KV's
redundancy term and SnapKV's score pooling are left out: both only change the ranking.)
"""

from __future__ import annotations

from typing import Optional

import torch

from kara_sglang.policies.base import DecodeCacheBudgetPolicy
from kara_sglang.token2chunk import topk_sorted
from kara_sglang.window import CompressionTask, WindowState


class ThresholdPolicy(DecodeCacheBudgetPolicy):
    name = "threshold"

    @property
    def query_ring(self) -> int:
        return self.config.buffer

    def plan(self, state: WindowState) -> Optional[CompressionTask]:
        cfg = self.config
        if not self.is_due(state):
            return None
        return CompressionTask(
            kv_start=state.prompt_len,
            n_keys=state.decode_kv - cfg.buffer,
            keep=cfg.window_budget - cfg.buffer,
            n_suffix=cfg.buffer,
            n_queries=self.query_ring,
        )

    def select(self, scores, task, n_windows, device) -> torch.Tensor:
        return topk_sorted(scores, task.keep)
