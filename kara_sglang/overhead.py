"""What compression costs the decode loop: host time of Kara's per-step hook, GPU time of the
compressions.

Both are cheap enough to stay on in production: the host side is two ``perf_counter`` calls
per decode step; the GPU side records a pair of CUDA events around each compression (a few
per hundred steps) and reads them only when counters are asked for, long after they fired,
so the decode loop never waits for the GPU.
"""

from __future__ import annotations

import time
from typing import List, Optional, Tuple

import torch


class OverheadMeter:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.hook_seconds = 0.0  # host time inside the per-step hook, compressions included
        self.decode_steps = 0
        self.compress_seconds = 0.0  # GPU time (CUDA) or host time (CPU) of compressions
        self._pending: List[Tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._start: Optional[object] = None

    def step_done(self, seconds: float) -> None:
        self.hook_seconds += seconds
        self.decode_steps += 1

    def compress_begin(self) -> None:
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._start = time.perf_counter()

    def compress_end(self) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self._pending.append((self._start, end))
        else:
            self.compress_seconds += time.perf_counter() - self._start

    def totals(self) -> dict:
        still = []
        for start, end in self._pending:
            if end.query():
                self.compress_seconds += start.elapsed_time(end) / 1e3
            else:
                still.append((start, end))
        self._pending = still
        return {"decode_steps": self.decode_steps, "hook_host_s": round(self.hook_seconds, 6),
                "compress_s": round(self.compress_seconds, 6)}
