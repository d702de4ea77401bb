"""A progress bar on stderr: tqdm when it is installed, else one rewritten line."""

from __future__ import annotations

import sys
import threading


class Progress:
    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.done = 0
        self._lock = threading.Lock()  # replies complete on the client's threads
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, desc=label, unit="req", file=sys.stderr, leave=True)
            except ImportError:
                self._write()

    def _write(self) -> None:
        sys.stderr.write(f"\r{self.label}: {self.done}/{self.total}")
        sys.stderr.flush()

    def step(self) -> None:
        with self._lock:
            self.done += 1
            if not self.enabled:
                return
            if self._bar is not None:
                self._bar.update(1)
            else:
                self._write()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            sys.stderr.write("\n")
