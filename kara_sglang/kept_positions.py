"""Which decode tokens a request still holds KV for: block coverage, for evaluation.

Off by default. With ``KARA_TRACK_KEPT=<block size>`` in a server's environment, every
request remembers the decode index (0 = its first decoded token) of each decode KV entry it
holds, and its response's ``meta_info["kv_kept_per_block"]`` carries, at the last output token,
how many of each ``block``-token run of decode indices are still held. A block with 0 lost every
token: the paper's claim is that Kara never wipes out a block, where policies that choose over
the whole decode cache (threshold, LongFlow) and StreamingLLM's middle can.

The cost is one device-to-host copy of the keep set per compression, hence opt-in.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence

ENV = "KARA_TRACK_KEPT"


def block_size_from_env() -> Optional[int]:
    value = os.environ.get(ENV, "")
    if value in ("", "0"):
        return None
    size = int(value)
    if size < 1:
        raise ValueError(f"{ENV} must be a block size >= 1, got {value!r}")
    return size


class KeptPositions:
    """The decode index of each decode KV column of one request, in column order."""

    __slots__ = ("decode_index", "decoded", "buffer_columns")

    def __init__(self) -> None:
        self.decode_index: List[int] = []
        self.decoded = 0
        # Recall buffer columns of the row (recall with a tier): they hold no decode token of
        # the row, and sit before every later compression's region.
        self.buffer_columns = 0

    def on_decode(self, n: int = 1) -> None:
        self.decode_index.extend(range(self.decoded, self.decoded + n))
        self.decoded += n

    def apply(self, region_start: int, n_keys: int, keep: Sequence[int], recall_buffer: int = 0) -> None:
        """A compression kept positions ``keep`` (ascending, relative to the region) of the
        ``n_keys`` decode columns from ``region_start`` (relative to the decode region).

        ``recall_buffer``: the compression also made R columns after the kept ones the row's
        recall buffer (``CompressionTask.recall_buffer``); they are no decode tokens, so they
        are not listed, but later regions' column offsets count them."""
        start = region_start - self.buffer_columns
        if start < 0 or start + n_keys > len(self.decode_index):
            raise AssertionError(f"kara: kept positions: region [{start}, {start + n_keys}) of "
                                 f"{len(self.decode_index)} tracked decode columns")
        region = self.decode_index[start:start + n_keys]
        self.decode_index[start:start + n_keys] = [region[k] for k in keep]
        self.buffer_columns += recall_buffer

    def per_block(self, block: int) -> List[int]:
        """Decode KV entries held in each ``block``-token run of decode indices written so far."""
        counts = [0] * ((self.decoded + block - 1) // block)
        for index in self.decode_index:
            counts[index // block] += 1
        return counts
