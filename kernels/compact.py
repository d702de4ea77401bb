"""Compaction: move kept tokens' K and V rows into place, every layer in one launch.

Needed for paged pools (page size > 1), where a request's KV must stay in whole pages:
after a window shrinks, the kept tokens and the tokens after them slide left into the
slots that the region's first positions already own, and whole pages at the end are freed.

Each program copies one column block of one buffer for one request, walking the request's
moves in order. That order makes in-place moves safe when the caller keeps this contract:
**the source of move i is never the destination of an earlier move j < i** (true for a
left slide: ``src`` is the slot at position ``keep[i] >= i``, ``dst`` the slot at
position ``i``). A move whose source equals its destination is skipped.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from kara_kernels._buffers import row_layout


@triton.jit
def _compact_kernel(
    BASE, OFFSETS, stride_slot,
    SRC, stride_src, DST, stride_dst, N_MOVES,
    row_elems,
    BLOCK: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_buf = tl.program_id(1)
    pid_col = tl.program_id(2)
    buf = BASE + tl.load(OFFSETS + pid_buf)
    cols = pid_col * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < row_elems
    n_moves = tl.load(N_MOVES + pid_b)
    src_row = SRC + pid_b.to(tl.int64) * stride_src
    dst_row = DST + pid_b.to(tl.int64) * stride_dst
    for i in range(0, n_moves):
        src = tl.load(src_row + i).to(tl.int64)
        dst = tl.load(dst_row + i).to(tl.int64)
        ok = col_ok & (src != dst)
        row = tl.load(buf + src * stride_slot + cols, mask=ok)
        tl.store(buf + dst * stride_slot + cols, row, mask=ok)


def compact_kv(
    buffers: Sequence[torch.Tensor],
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    n_moves: torch.Tensor,
    block: int = 256,
    num_warps: int = 1,
) -> None:
    """Copy ``buffers[*][src_slots[b, i]]`` to ``buffers[*][dst_slots[b, i]]`` in place.

    Args:
        buffers: every per-layer K and V buffer, each ``[num_slots, heads, head_dim]`` (or
            any shape whose first axis is the slot), one dtype and layout.
        src_slots, dst_slots: ``[B, max_moves]`` int slots, under the ordering contract above.
        n_moves: ``[B]`` int32, moves used in each row (the rest is padding).
    """
    if src_slots.shape != dst_slots.shape or src_slots.stride(1) != 1 or dst_slots.stride(1) != 1:
        raise ValueError("src_slots and dst_slots must have the same shape, rows contiguous")
    n_req = src_slots.shape[0]
    if n_req == 0 or src_slots.shape[1] == 0:
        return
    base, offsets, stride_slot, row_elems = row_layout(buffers)
    block = min(block, triton.next_power_of_2(row_elems))
    grid = (n_req, len(buffers), triton.cdiv(row_elems, block))
    _compact_kernel[grid](
        base, offsets, stride_slot,
        src_slots, src_slots.stride(0), dst_slots, dst_slots.stride(0), n_moves,
        row_elems, BLOCK=block, num_warps=num_warps,
    )


def compact_kv_reference(buffers, src_slots, dst_slots, n_moves) -> None:
    """Sequential torch version of :func:`compact_kv`, for tests."""
    for b in range(src_slots.shape[0]):
        for i in range(int(n_moves[b])):
            s, d = int(src_slots[b, i]), int(dst_slots[b, i])
            for buf in buffers:
                buf[d] = buf[s]
