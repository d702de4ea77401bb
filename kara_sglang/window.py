"""Per-request bookkeeping of the decode tail: when to compress, and where.

Positions here are *KV indices*: the column of the request's row in SGLang's
``req_to_token`` table. The prompt occupies ``[0, prompt_len)`` and is never touched; the
decode region follows it. After ``evicted`` tokens were dropped, the KV index of a token is
smaller than its RoPE position by ``evicted``: that is the position offset the adapter adds.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CompressionTask:
    """One compression of one request, decided by a policy.

    The region ``[kv_start, kv_start + n_keys)`` shrinks to ``keep`` tokens; the
    ``n_suffix`` tokens after it slide left to follow them. ``n_queries`` captured queries
    (the whole query ring of the request) vote; 0 means the policy needs no scores.

    ``recall_buffer`` (recall with a tier, kara_sglang/recall_tier.py): the last R of the
    ``keep`` columns are not chosen by the policy (it keeps ``keep - R``) but take R of the
    evicted tokens' slots, which become the request's recall buffer: each decode step
    overwrites them with the tier tokens its query selects, so SGLang's own attention reads
    them with the resident tokens. Their tokens are evicted as the others are (into the tier).
    """

    kv_start: int
    n_keys: int
    keep: int
    n_suffix: int
    n_queries: int
    recall_buffer: int = 0

    @property
    def n_evicted(self) -> int:
        return self.n_keys - self.keep

    @property
    def old_end(self) -> int:
        return self.kv_start + self.n_keys + self.n_suffix

    @property
    def new_end(self) -> int:
        return self.kv_start + self.keep + self.n_suffix

    @property
    def shape(self) -> tuple:
        """Tasks of equal shape are scored and selected together in one batch."""
        return (self.n_keys, self.keep, self.n_suffix, self.n_queries, self.recall_buffer)

    @property
    def policy_keep(self) -> int:
        """Tokens the policy chooses to keep (``keep`` less the recall buffer's columns)."""
        return self.keep - self.recall_buffer


@dataclass
class WindowState:
    """What one request's decode region looks like right now.

    Attributes:
        prompt_len: KV entries of the prompt (and of the matched prefix): never compressed.
        decode_kv: decode KV entries currently held (compressed windows + the tail).
        tail: decode entries at the end that no compression has touched yet.
        decoded: decode entries ever written; the i-th one's query lives in ring slot
            ``i % ring_size`` of the request's query buffer.
        evicted: tokens dropped so far; the RoPE position offset of later tokens.
        events: compressions done.
    """

    prompt_len: int
    decode_kv: int = 0
    tail: int = 0
    decoded: int = 0
    evicted: int = 0
    events: int = 0

    def __post_init__(self) -> None:
        if self.prompt_len < 0:
            raise ValueError(f"prompt_len must be >= 0, got {self.prompt_len}")

    @property
    def kv_len(self) -> int:
        return self.prompt_len + self.decode_kv

    @property
    def next_position(self) -> int:
        """RoPE position of the next token written (its KV index is ``kv_len``)."""
        return self.kv_len + self.evicted

    def on_decode(self, n: int = 1) -> None:
        """Record ``n`` newly written decode KV entries."""
        self.decode_kv += n
        self.tail += n
        self.decoded += n

    def apply(self, task: CompressionTask, tail_consumed: int) -> None:
        """Record a finished compression; ``tail_consumed`` tail tokens became final."""
        if task.old_end != self.kv_len:
            raise AssertionError(f"task ends at {task.old_end}, request KV ends at {self.kv_len}")
        self.decode_kv -= task.n_evicted
        self.evicted += task.n_evicted
        self.tail -= tail_consumed
        self.events += 1
