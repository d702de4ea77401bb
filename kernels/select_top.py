"""Exact top-R selection per row of scores, by radix select: one program per (request, KV head).

The recall tier ranks every tier token of a request per KV head each decode step and keeps the
R best. ``torch.topk`` sorts its way there (0.25 to 0.31 ms per layer at batch 100 and 14k to
17k columns on an H200, 10 ms a step); here a program finds the R-th largest score by four
8-bit histogram passes over order-preserving int32 keys of the float32 scores, then
writes the positions at or above it in one more pass. Each pass reads the row (from L2 after
the first), and nothing is sorted.

A server with a recall tier times it against ``torch.topk`` at start-up and keeps the faster
(kara_sglang/recall_tune.py); on an H200 at that shape it took 0.285 ms per layer against
torch.topk's 0.317 (benchmarks/reasoning/rank_select_bench.py, which checks that both pick
the same scores).

Semantics: for row ``(b, h)`` with ``n = min(lens[b], n_cols)`` valid columns, the result's
first ``min(R, n)`` entries are the column indices of the ``min(R, n)`` largest scores among
columns ``[0, n)``, in increasing column order; ties at the threshold are taken lowest column
first; the remaining entries are -1. Deterministic: the same scores give the same picks on
every rank of a TP group. NaN scores are not allowed (the ranking never produces them).

``top_of_row`` is the selection as a device function: the recall tier's rankings call it at
their end to select from the scores they just wrote (kernels/recall_pages.py), without a
launch of their own.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kara_kernels._buffers import interpreting

__all__ = ["SORTED_MAX_COLS", "select_top", "top_columns", "top_of_row", "top_of_row_sorted"]

SORTED_MAX_COLS = 4096  # the sorted selection holds a row in registers: 32 int64 a thread at 4 warps


@triton.jit
def _key(x):
    """int32 keys ordered as the float32 scores: negative floats flip their 31 low bits (a larger
    magnitude becomes a smaller integer); -0.0 becomes +0.0's key (they compare equal)."""
    i = x.to(tl.int32, bitcast=True)
    i = tl.where(i == -2147483648, 0, i)
    return tl.where(i < 0, i ^ 0x7FFFFFFF, i)


@triton.jit
def top_of_row(src, n, R, dst, pages, PAGE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr):
    """``dst[0:R]``: the columns of the ``min(n, R)`` largest of ``src[0:n]`` in column order
    (module docstring), then -1. Also the epilogue of the rankings that select in the kernel
    that scored (kernels/recall_pages.py): with ``PAGE`` > 0 a pick ``c`` is written as the
    column ``pages[c // PAGE] * PAGE + c % PAGE``, and a pick of a -inf score (no token) as -1."""
    k = tl.minimum(n, R)
    bins = tl.arange(0, 256)
    # The k-th largest key, 8 bits at a time from the top: `prefix` holds the bits found so far,
    # `k_left` how many of the keys sharing them still have to be taken.
    prefix = tl.zeros((), tl.int32)
    k_left = k
    for p in tl.static_range(4):
        shift = 24 - 8 * p
        hist = tl.zeros((256,), tl.int32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            valid = offs < n
            key = _key(tl.load(src + offs, mask=valid, other=0.0))
            if p == 0:  # the top byte in signed order is the byte with its top bit flipped
                digit = ((key >> 24) & 255) ^ 128
            else:
                valid = valid & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
                digit = (key >> shift) & 255
            hist += tl.histogram(digit, 256, mask=valid)
        # above[d]: keys with this prefix and a digit greater than d; the k-th largest has the
        # digit d with above[d] < k_left <= above[d] + hist[d].
        above = tl.sum(hist, 0) - tl.cumsum(hist, 0)
        hit = (above < k_left) & (above + hist >= k_left)
        digit_k = tl.sum(tl.where(hit, bins, 0), 0)
        if p == 0:
            digit_k = digit_k ^ 128
        prefix = prefix | (digit_k << shift)
        k_left = k_left - tl.sum(tl.where(hit, above, 0), 0)
    # Every key above the threshold, and the first k_left equal to it, in column order.
    written = tl.zeros((), tl.int32)
    ties_seen = tl.zeros((), tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        valid = offs < n
        score = tl.load(src + offs, mask=valid, other=0.0)
        key = _key(score)
        tie = valid & (key == prefix)
        take = (valid & (key > prefix)) | (tie & (tl.cumsum(tie.to(tl.int32), 0) + ties_seen <= k_left))
        pos = written + tl.cumsum(take.to(tl.int32), 0) - 1
        pick = offs.to(tl.int64)
        if PAGE:
            page = tl.load(pages + offs // PAGE, mask=take, other=-1).to(tl.int64)
            pick = tl.where((page >= 0) & (score != float("-inf")), page * PAGE + pick % PAGE, -1)
        tl.store(dst + pos, pick, mask=take)
        written += tl.sum(take.to(tl.int32), 0)
        ties_seen += tl.sum(tie.to(tl.int32), 0)
    for start in range(k, R, BLOCK_R):
        offs_r = start + tl.arange(0, BLOCK_R)
        tl.store(dst + offs_r, tl.full((BLOCK_R,), -1, tl.int64), mask=offs_r < R)


@triton.jit
def top_of_row_sorted(src, n, R, dst, pages, PAGE: tl.constexpr, BLOCK: tl.constexpr, K_PAD: tl.constexpr):
    """:func:`top_of_row`'s picks, written the same way, for a row that fits one block
    (``n <= BLOCK``, ``R <= K_PAD <= BLOCK``, powers of two, ``K_PAD`` >= 2): the row is read once into
    registers as int64 keys (score key above, inverted column below, so a tie goes to the
    lowest column), a bitonic top-``K_PAD`` keeps the best, and a sort of their columns puts
    them in column order. No pass over memory after the first, where the radix selection
    makes five."""
    offs = tl.arange(0, BLOCK)
    valid = offs < n
    score = tl.load(src + offs, mask=valid, other=float("-inf"))
    packed = (_key(score).to(tl.int64) << 32) | (0x7FFFFFFF - offs).to(tl.int64)
    packed = tl.where(valid, packed, -9223372036854775807 - 1)  # int64's minimum: no column
    best = tl.topk(packed, K_PAD)  # descending
    rank = tl.arange(0, K_PAD)
    take = (rank < R) & (best != -9223372036854775807 - 1)
    col = 0x7FFFFFFF - (best & 0xFFFFFFFF)
    neg_inf = ((best >> 32) == _key(tl.full((), float("-inf"), tl.float32)).to(tl.int64)).to(tl.int64)
    # Column order; a pick of a -inf score keeps its place (flag bit) and not-taken (2 ** 62,
    # above any column * 2 + 1) go last.
    order = tl.sort(tl.where(take, col * 2 + neg_inf, 4611686018427387904))
    picked = order != 4611686018427387904
    c = order >> 1
    pick = c
    if PAGE:
        page = tl.load(pages + c // PAGE, mask=picked, other=-1).to(tl.int64)
        pick = tl.where((page >= 0) & ((order & 1) == 0), page * PAGE + c % PAGE, -1)
    tl.store(dst + rank, tl.where(picked, pick, -1), mask=rank < R)


@triton.jit
def _select_top_kernel(
    RANK, stride_rb, stride_rh, LENS, OUT, stride_ob, stride_oh, n_cols, R,
    BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, SORTED: tl.constexpr,
):
    pid_b = tl.program_id(0)
    head = tl.program_id(1)
    n = tl.minimum(tl.load(LENS + pid_b).to(tl.int32), n_cols)
    src = RANK + pid_b.to(tl.int64) * stride_rb + head * stride_rh
    dst = OUT + pid_b.to(tl.int64) * stride_ob + head * stride_oh
    if SORTED:
        top_of_row_sorted(src, n, R, dst, LENS, 0, BLOCK, BLOCK_R)
    else:
        top_of_row(src, n, R, dst, LENS, 0, BLOCK, BLOCK_R)


def select_top(rank: torch.Tensor, lens: torch.Tensor, tokens: int, n_cols: Optional[int] = None,
               block: int = 2048, num_warps: int = 4, method: str = "radix") -> torch.Tensor:
    """``[B, H, tokens]`` int64: per row, the columns of its ``tokens`` largest scores among the
    first ``lens[b]`` (module docstring), then -1.

    Args:
        rank: ``[B, H, C]`` float32 scores, unit last stride.
        lens: ``[B]`` valid columns per request (clipped to ``n_cols``).
        tokens: R.
        n_cols: columns considered (default C).
        method: ``radix`` (:func:`top_of_row`) or ``sorted`` (:func:`top_of_row_sorted`, rows
            of at most :data:`SORTED_MAX_COLS` columns; ``block`` is then the row's).
    Device work only (no host read): a CUDA graph replays it.
    """
    if rank.dtype != torch.float32 or rank.dim() != 3 or rank.stride(2) != 1:
        raise ValueError("rank must be a float32 [B, H, C] tensor with unit last stride")
    B, H, C = rank.shape
    n_cols = C if n_cols is None else n_cols
    if not 0 <= n_cols <= C:
        raise ValueError(f"n_cols {n_cols} outside [0, {C}]")
    out = torch.empty(B, H, tokens, dtype=torch.int64, device=rank.device)
    if B == 0 or H == 0 or tokens == 0:
        return out
    block_r = min(1024, triton.next_power_of_2(tokens))
    if method == "sorted":
        block_r = max(16, triton.next_power_of_2(tokens))  # tl.topk of 1 is a scalar
        block = max(16, block_r, triton.next_power_of_2(max(1, n_cols)))
        if block > SORTED_MAX_COLS:
            raise ValueError(f"method 'sorted' reads a row of at most {SORTED_MAX_COLS} columns and "
                             f"picks, got {n_cols} columns and {tokens} picks")
    elif method != "radix":
        raise ValueError(f"unknown selection method {method!r}")
    elif interpreting():
        block = max(16, min(block, triton.next_power_of_2(max(1, n_cols))))
    _select_top_kernel[(B, H)](
        rank, rank.stride(0), rank.stride(1), lens, out, out.stride(0), out.stride(1), n_cols, tokens,
        BLOCK=block, BLOCK_R=block_r, SORTED=method == "sorted", num_warps=num_warps,
    )
    return out


def top_columns(rank: torch.Tensor, lens: torch.Tensor, tokens: int, n_cols: int, select: str) -> torch.Tensor:
    """``[B, Hkv, min(R, n_cols)]`` each request's highest-ranked columns below its count; past
    it -1 (no token). ``torch``: in score order; ``radix``: in column order."""
    tokens = min(tokens, n_cols)
    if select == "radix":
        return select_top(rank, lens, tokens, n_cols)
    top = rank.topk(tokens, dim=-1)
    return top.indices.masked_fill(top.values == float("-inf"), -1)
