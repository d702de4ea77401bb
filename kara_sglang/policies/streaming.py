"""StreamingLLM-style baseline: keep ``sink`` first decode tokens and the most recent ones.

The prompt (which holds the true attention sinks) is never touched. When the decode region
reaches ``budget + U`` tokens it is cut back to ``budget``: the first ``sink`` decode tokens
plus the newest ``budget - sink``. No scores are needed.
"""

from __future__ import annotations

from typing import Optional

import torch

from kara_sglang.policies.base import DecodeCacheBudgetPolicy
from kara_sglang.window import CompressionTask, WindowState


class StreamingPolicy(DecodeCacheBudgetPolicy):
    name = "streaming"

    def plan(self, state: WindowState) -> Optional[CompressionTask]:
        cfg = self.config
        if not self.is_due(state):
            return None
        return CompressionTask(
            kv_start=state.prompt_len, n_keys=state.decode_kv, keep=cfg.window_budget,
            n_suffix=0, n_queries=0,
        )

    def select(self, scores, task, n_windows, device) -> torch.Tensor:
        sink = self.config.sink
        recent = torch.arange(task.n_keys - (task.keep - sink), task.n_keys, device=device)
        keep = torch.cat([torch.arange(sink, device=device), recent])
        return keep.expand(n_windows, -1).contiguous()
