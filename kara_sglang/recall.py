"""Recall: evicted KV that a later decode step looks up is attended to again (emulated).

Kara decides what to keep before the lookup that needs it exists; recall lets each decode
step choose, from its own query, which evicted tokens to attend to. This module is the
*emulation* that measures what recall does to answers: a compressed request's evicted slots
are not freed but held here (their KV stays where it was: with page size 1 compaction only
rewrites the ``req_to_token`` row), and each decode step attends, per layer and KV head, to
the request's resident tokens plus the ``tokens`` evicted tokens its digest ranks highest.
Memory is not saved (the held slots stay allocated until the request ends); the point is the
accuracy answer, through the real scheduler.

Digests (what ranks the evicted tokens; the probe in benchmarks/reasoning/recall_probe.py):
``exact`` q·k with the real keys; ``bitsN`` q·k' with k' the key quantised per token and KV
head to N bits, asymmetric min/max in groups of 32 channels. A token's score for a KV head
is the max over its GQA group's query heads. Lag 0 ranks with the step's own query; lag 1
with the previous step's (what a system fetching ahead of the step would have).

Engine-independent: tensors in, tensors out.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

QUANT_GROUP = 32  # channels per scale/zero pair of a quantised key digest


class RecallStore:
    """The evicted slots each ``req_to_token`` row holds, in eviction order.

    ``slots[row, :count(row)]`` on the device; the counts are kept on the host too (they
    change only at compressions and releases, which the host schedules), so a step never
    reads the device to size its work.
    """

    def __init__(self, rows: int, capacity: int, device: torch.device) -> None:
        self.slots = torch.zeros(rows, capacity, dtype=torch.int64, device=device)
        self.counts = torch.zeros(rows, dtype=torch.int64, device=device)
        self._host: Dict[int, int] = {}  # row -> held slots (rows holding none are absent)

    @property
    def held(self) -> int:
        """Slots held over all rows (allocated, owned by no row of SGLang's)."""
        return sum(self._host.values())

    @property
    def longest(self) -> int:
        return max(self._host.values(), default=0)

    def count(self, row: int) -> int:
        return self._host.get(row, 0)

    def hold(self, rows: Sequence[int], per_row: Sequence[int], slots: torch.Tensor) -> None:
        """Append ``slots`` (concatenated, ``per_row[i]`` for ``rows[i]``) to their rows."""
        start = 0
        for row, n in zip(rows, per_row):
            if n == 0:
                continue
            have = self._host.get(row, 0)
            if have + n > self.slots.shape[1]:
                raise AssertionError(f"kara recall: row {row} would hold {have + n} evicted slots "
                                     f"(capacity {self.slots.shape[1]})")
            self.slots[row, have:have + n] = slots[start:start + n]
            self._host[row] = have + n
            self.counts[row] = have + n
            start += n
        if start != slots.numel():
            raise AssertionError(f"kara recall: {slots.numel()} evicted slots for {start} counted")

    def release(self, row: int) -> torch.Tensor:
        """The row's held slots (to be freed by the caller); the row then holds none."""
        n = self._host.pop(row, 0)
        if n == 0:
            return self.slots.new_empty(0)
        self.counts[row] = 0
        return self.slots[row, :n].clone()


def quantised(keys: torch.Tensor, bits: int, group: int = QUANT_GROUP) -> torch.Tensor:
    """``keys`` ``[..., D]`` rounded to ``bits`` per channel, asymmetric min/max per group of
    ``group`` channels (the values a low-bit key digest would hold), as float32."""
    shape = keys.shape
    g = keys.float().reshape(*shape[:-1], shape[-1] // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = (hi - lo).clamp_min(1e-8) / (2 ** bits - 1)
    return (torch.round((g - lo) / scale) * scale + lo).reshape(shape)


def recall_attention(q: torch.Tensor, select_q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                     resident_slots: torch.Tensor, resident_lens: torch.Tensor,
                     evicted_slots: torch.Tensor, evicted_lens: torch.Tensor,
                     tokens: int, digest: str, sm_scale: float) -> torch.Tensor:
    """Decode attention of each request over its resident tokens plus its selected evicted ones.

    Args:
        q, select_q: ``[B, Hq, D]`` the step's queries; the queries that rank (lag 0: ``q``).
        k_buffer, v_buffer: ``[slots, Hkv, D]`` / ``[slots, Hkv, Dv]`` one layer's pool.
        resident_slots: ``[B, L]`` slots of each request's resident KV (valid below
            ``resident_lens``, which counts the step's own token).
        evicted_slots: ``[B, E]`` the request's held evicted slots (valid below ``evicted_lens``).
        tokens: R, evicted tokens selected per KV head (all of them if fewer).
    Returns:
        ``[B, Hq, Dv]`` float32.
    """
    B, Hq, D = q.shape
    Hkv = k_buffer.shape[1]
    G = Hq // Hkv
    qg = q.float().view(B, Hkv, G, D)

    def logits(slots: torch.Tensor, keys: Optional[torch.Tensor] = None, queries=qg) -> torch.Tensor:
        k = (k_buffer[slots] if keys is None else keys).float()  # [B, N, Hkv, D]
        return torch.einsum("bhgd,bnhd->bhgn", queries, k) * sm_scale  # [B, Hkv, G, N]

    L, E = resident_slots.shape[1], evicted_slots.shape[1]
    res_valid = torch.arange(L, device=q.device)[None, :] < resident_lens[:, None]  # [B, L]
    res = logits(resident_slots).masked_fill(~res_valid[:, None, None, :], float("-inf"))
    ev_valid = torch.arange(E, device=q.device)[None, :] < evicted_lens[:, None]  # [B, E]
    ev_keys = k_buffer[evicted_slots]  # gathered once: the logits and the digest both read it
    ev = logits(evicted_slots, ev_keys).masked_fill(~ev_valid[:, None, None, :], float("-inf"))

    # Rank the evicted tokens per KV head by the digest, max over the group's query heads.
    if digest == "exact" and select_q is q:
        rank = ev.amax(2)  # [B, Hkv, E]: the logits just computed
    else:
        keys = ev_keys if digest == "exact" else quantised(ev_keys, int(digest[len("bits"):]))
        rank = logits(evicted_slots, keys, select_q.float().view(B, Hkv, G, D)).amax(2)
        rank = rank.masked_fill(~ev_valid[:, None, :], float("-inf"))
    chosen = torch.zeros_like(rank, dtype=torch.bool)
    if E and tokens:
        top = rank.topk(min(tokens, E), dim=-1).indices
        chosen.scatter_(-1, top, True)
    chosen &= ev_valid[:, None, :]
    ev = ev.masked_fill(~chosen[:, :, None, :], float("-inf"))

    weights = torch.cat([res, ev], dim=-1).softmax(-1)  # [B, Hkv, G, L + E]
    values = torch.cat([v_buffer[resident_slots], v_buffer[evicted_slots]], dim=1).float()  # [B, L+E, Hkv, Dv]
    out = torch.einsum("bhgn,bnhd->bhgd", weights, values)
    return out.reshape(B, Hq, -1)

