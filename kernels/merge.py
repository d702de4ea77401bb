"""Merging: write weighted sums of K and V rows into destination slots, every layer in one launch.

For every merge ``m`` and every buffer (each layer's K and V):

    buf[dst[m]] = sum over i < n_src[m] of weights[m, i] * buf[src[m, i]]

accumulated in float32 and rounded once to the buffer's dtype. Each program owns one column
block of one buffer for one merge: it reads all of the merge's source rows before it writes
the destination, so the destination may be one of the sources. Different merges run in
parallel, so the caller keeps this contract: **no merge's destination is a source or the
destination of another merge** (true for CASK: groups are disjoint and each writes into the
slot of one of its own members). Plain row sums: no ``tl.dot`` (whose bf16 form the Triton
3.6 CPU interpreter gets wrong).
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from kara_kernels._buffers import row_layout


@triton.jit
def _merge_kernel(
    BASE, OFFSETS, stride_slot,
    DST, SRC, stride_src, WEIGHTS, stride_w, N_SRC,
    row_elems,
    BLOCK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_buf = tl.program_id(1)
    pid_col = tl.program_id(2)
    buf = BASE + tl.load(OFFSETS + pid_buf)
    cols = pid_col * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < row_elems
    n_src = tl.load(N_SRC + pid_m)
    src_row = SRC + pid_m.to(tl.int64) * stride_src
    w_row = WEIGHTS + pid_m.to(tl.int64) * stride_w
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n_src):
        src = tl.load(src_row + i).to(tl.int64)
        w = tl.load(w_row + i).to(tl.float32)
        row = tl.load(buf + src * stride_slot + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc += w * row
    dst = tl.load(DST + pid_m).to(tl.int64)
    tl.store(buf + dst * stride_slot + cols, acc.to(buf.dtype.element_ty), mask=col_ok & (n_src > 0))


def merge_kv(
    buffers: Sequence[torch.Tensor],
    dst_slots: torch.Tensor,
    src_slots: torch.Tensor,
    weights: torch.Tensor,
    n_src: torch.Tensor,
    block: int = 256,
    num_warps: int = 1,
) -> None:
    """``buffers[*][dst_slots[m]] = sum_i weights[m, i] * buffers[*][src_slots[m, i]]`` in place.

    Args:
        buffers: every per-layer K and V buffer, each ``[num_slots, heads, head_dim]`` (or any
            shape whose first axis is the slot), one dtype and layout.
        dst_slots: ``[M]`` int slot each merge writes (may be one of its sources).
        src_slots: ``[M, max_src]`` int source slots, rows contiguous (padding past ``n_src``).
        weights: ``[M, max_src]`` float32 weight of each source.
        n_src: ``[M]`` int32 sources used in each merge (0: the merge writes nothing).
    """
    if src_slots.shape != weights.shape or src_slots.stride(1) != 1 or weights.stride(1) != 1:
        raise ValueError("src_slots and weights must have the same shape, rows contiguous")
    if dst_slots.shape != (src_slots.shape[0],) or n_src.shape != dst_slots.shape:
        raise ValueError("dst_slots and n_src must have one entry per merge")
    n_merges = src_slots.shape[0]
    if n_merges == 0 or src_slots.shape[1] == 0:
        return
    base, offsets, stride_slot, row_elems = row_layout(buffers)
    dst_slots = dst_slots.contiguous()
    n_src = n_src.to(torch.int32).contiguous()
    weights = weights.float()
    block = min(block, triton.next_power_of_2(row_elems))
    grid = (n_merges, len(buffers), triton.cdiv(row_elems, block))
    _merge_kernel[grid](
        base, offsets, stride_slot,
        dst_slots, src_slots, src_slots.stride(0), weights, weights.stride(0), n_src,
        row_elems, BLOCK=block, num_warps=num_warps,
    )


def merge_kv_reference(buffers, dst_slots, src_slots, weights, n_src) -> None:
    """Float64 torch version of :func:`merge_kv`, for tests (all sources read before any write)."""
    results = []
    for m in range(dst_slots.shape[0]):
        n = int(n_src[m])
        if n == 0:
            continue
        src = src_slots[m, :n].long()
        w = weights[m, :n].double()
        for buf in buffers:
            rows = buf[src].double()
            merged = (w.view(-1, *([1] * (rows.dim() - 1))) * rows).sum(dim=0)
            results.append((buf, int(dst_slots[m]), merged))
    for buf, dst, merged in results:
        buf[dst] = merged.to(buf.dtype)
