"""Refresh a recall buffer: write only the picks it does not already hold.

Each decode step and layer, a request's recall buffer gets the R tier tokens its query selects
(kernels/recall_tier.py ``fill_recall_buffer`` writes all R, dequantised, into the buffer's
pool slots, where SGLang's attention reads them). Consecutive steps select mostly the same
tokens: the recall probe counted 61-91 of 256 new per step (docs/accuracy.md), so most of those
writes put back what the slot already holds. Here a ``held`` map records, per row, KV head and
buffer position, which tier column the slot holds for that head (-1: unknown, e.g. a new
buffer), and a step writes only:

- the picks not held anywhere in the buffer,
- into positions whose column is not among the picks, taken in position order.

Positions nobody takes keep their column and their KV (``held`` stays true), so a later step
selecting that column again finds it held. Attention reads the buffer as a set, so where a
token sits does not matter. Device work only (a CUDA graph replays it), two launches:

1. a plan per request and KV head (one program each): the picks and the held columns are
   marked in two zeroed bitmaps over the row's tier columns, so each membership test is one
   load and a program's work is linear in R (the pairwise test it replaces, R x R compares a
   program, took 0.14 ms per layer at 100 requests on an H200 with nothing to write);
2. the planned writes, dequantised, in blocks of a few picks, so a step's new picks spread over
   many programs instead of one program per request and head.

The plan carries each write's pool slot (the buffer position's) and tier slot (the column's),
resolved by the plan's program, so a write program's loads form a chain of two: its block of
the plan with the plan's length, then the tier's codes. Resolving them there instead (plan ->
tier table and buffer slot -> codes -> store, after a branch on the length) made the writes a
chain of four dependent loads per program: at full churn on an H100 they moved ~480 GB/s, a
sixth of the bandwidth (docs/results/raw-2026-12-05g-h100-horizon125-profile).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kara_kernels._buffers import interpreting
from kara_kernels.recall import QUANT_GROUP
from kara_kernels.recall_tier import _block, _check_bits, _check_dims, _check_pool, _check_tier

__all__ = ["refresh_recall_buffer"]


@triton.jit
def _plan_refresh_kernel(
    SEL, stride_selb, stride_selh, n_sel,
    HELD, stride_hr, stride_hh, R,
    MARKS, stride_mb, stride_mh, stride_mk,
    PLAN, stride_pb, stride_ph, stride_pk, N_NEW,
    ROWS, T_LENS, LIVE, TT, stride_tt, BUF, stride_buf, COUNTS,
    BLOCK: tl.constexpr, COUNT: tl.constexpr,
):
    """Which picks a buffer lacks and where they go: two bitmaps of tier columns (picked, held;
    zeroed by the caller) make every membership test one load, so a program's work is linear
    in R. Writes the plan (buffer positions; the writes' tier slots and pool slots) and its
    length; updates held. COUNT: adds the picks and the writes to COUNTS[0] and COUNTS[1]."""
    pid_b = tl.program_id(0)
    head = tl.program_id(1)
    n_new = tl.zeros((), tl.int32)
    if tl.load(LIVE + pid_b) != 0:
        row = tl.load(ROWS + pid_b).to(tl.int64)
        n_tier = tl.load(T_LENS + pid_b)
        held = HELD + row * stride_hr + head * stride_hh
        sel = SEL + pid_b.to(tl.int64) * stride_selb + head * stride_selh
        picked_marks = MARKS + pid_b.to(tl.int64) * stride_mb + head * stride_mh
        held_marks = picked_marks + stride_mk
        plan = PLAN + pid_b.to(tl.int64) * stride_pb + head * stride_ph
        offs = tl.arange(0, BLOCK)
        new = tl.load(sel + offs, mask=offs < n_sel, other=-1)
        valid = (new >= 0) & (new < n_tier)
        new = tl.where(valid, new, 0).to(tl.int32)
        old = tl.load(held + offs, mask=offs < R, other=-1)
        was = old >= 0
        old = tl.where(was, old, 0)
        tl.atomic_or(picked_marks + (new >> 5), 1 << (new & 31), mask=valid)
        tl.atomic_or(held_marks + (old >> 5), 1 << (old & 31), mask=was)
        tl.debug_barrier()  # every mark set; the tests read L2 (.cg), where the atomics wrote
        found = (tl.load(held_marks + (new >> 5), mask=valid, other=0, cache_modifier=".cg") >> (new & 31)) & 1
        stays = (tl.load(picked_marks + (old >> 5), mask=was, other=0, cache_modifier=".cg") >> (old & 31)) & 1
        # The positions whose column is not picked, in position order, take the picks not held.
        is_free = (offs < R) & (stays == 0)
        n_free = tl.sum(is_free.to(tl.int32), 0)
        free_rank = tl.cumsum(is_free.to(tl.int32), 0) - 1
        need = valid & (found == 0)
        need_rank = tl.cumsum(need.to(tl.int32), 0) - 1
        need = need & (need_rank < n_free)  # only repeated picks could outnumber the free positions
        n_new = tl.sum(need.to(tl.int32), 0)
        # Ranks are distinct, so each rank below n_new is written once: position, then column.
        tl.store(plan + free_rank, offs, mask=is_free & (free_rank < n_new))
        tl.store(plan + stride_pk + need_rank, tl.load(TT + row * stride_tt + new, mask=need, other=0), mask=need)
        tl.debug_barrier()  # the plan's positions, written by all of this program's threads
        pos = tl.load(plan + need_rank, mask=need, other=0)
        tl.store(held + pos, new, mask=need)
        tl.store(plan + 2 * stride_pk + need_rank, tl.load(BUF + row * stride_buf + pos, mask=need, other=0),
                 mask=need)
        if COUNT:  # the hit rate's counters: one atomic each a program
            tl.atomic_add(COUNTS, tl.sum(valid.to(tl.int64), 0))
            tl.atomic_add(COUNTS + 1, n_new.to(tl.int64))
    tl.store(N_NEW + pid_b * tl.num_programs(1) + head, n_new)


@triton.jit
def _write_dequantised(XC, stride_xcs, stride_xch, XLO, XST, stride_xss, stride_xsh,
                       OUT, stride_os, stride_oh, src, dst, head, need,
                       DIM: tl.constexpr, BLOCK: tl.constexpr, BITS: tl.constexpr, QGROUP: tl.constexpr):
    """Pool slots ``dst`` of one KV head (K or V) get tier slots ``src``'s codes dequantised, as
    ``dequant_tokens`` computes them, from one load per code byte and one per channel group
    (loads per channel, a 64-bit address each, took 72 registers a thread at 8 picks on 4
    warps, this 40: 12 programs an SM instead of 7, benchmarks/kernel_resources.py). Channels
    are unpacked in order: byte j holds channels j * (8 // BITS) + i in its bits i * BITS."""
    PER_BYTE: tl.constexpr = 8 // BITS
    N_BYTES: tl.constexpr = BLOCK // PER_BYTE
    N_GROUPS: tl.constexpr = BLOCK // QGROUP
    offs_b = tl.arange(0, N_BYTES)
    byte = tl.load(XC + src[:, None] * stride_xcs + head * stride_xch + offs_b[None, :],
                   mask=need[:, None] & (offs_b < DIM // PER_BYTE)[None, :], other=0).to(tl.int32)
    MASK: tl.constexpr = 2 ** BITS - 1
    if PER_BYTE == 1:
        code = byte
    elif PER_BYTE == 2:
        code = tl.reshape(tl.join(byte & MASK, byte >> 4), (src.shape[0], BLOCK))
    else:  # 2 bits: [byte, k, m] holds channel 2m + k of the byte; put m before k
        pairs = tl.join(tl.join(byte & MASK, (byte >> 2) & MASK), tl.join((byte >> 4) & MASK, byte >> 6))
        code = tl.reshape(tl.permute(pairs, (0, 1, 3, 2)), (src.shape[0], BLOCK))
    offs_g = tl.arange(0, N_GROUPS)
    mg = need[:, None] & (offs_g < DIM // QGROUP)[None, :]
    s_off = src[:, None] * stride_xss + head * stride_xsh + offs_g[None, :]
    step = tl.load(XST + s_off, mask=mg, other=0.0).to(tl.float32)
    lo = tl.load(XLO + s_off, mask=mg, other=0.0).to(tl.float32)
    x = (tl.reshape(code, (src.shape[0], N_GROUPS, QGROUP)).to(tl.float32) * step[:, :, None] + lo[:, :, None])
    offs_d = tl.arange(0, BLOCK)
    tl.store(OUT + dst[:, None] * stride_os + head * stride_oh + offs_d[None, :],
             tl.reshape(x, (src.shape[0], BLOCK)).to(OUT.dtype.element_ty),
             mask=need[:, None] & (offs_d < DIM)[None, :])


@triton.jit
def _write_planned_kernel(
    PLAN, stride_pb, stride_ph, stride_pk, N_NEW,
    KC, stride_kcs, stride_kch, KLO, KST, stride_kss, stride_ksh,
    VC, stride_vcs, stride_vch, VLO, VST, stride_vss, stride_vsh,
    KOUT, stride_kos, stride_koh, VOUT, stride_vos, stride_voh, R,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_W: tl.constexpr, BITS: tl.constexpr, QGROUP: tl.constexpr,
):
    """One block of BLOCK_W planned picks of one request and KV head, dequantised into the
    buffer's pool slots. The plan's length and its block load together (no branch on the
    length first): entries past the length only mask the codes' loads and the stores."""
    pid_b = tl.program_id(0)
    head = tl.program_id(1)
    plan = PLAN + pid_b.to(tl.int64) * stride_pb + head * stride_ph
    offs = tl.program_id(2) * BLOCK_W + tl.arange(0, BLOCK_W)
    in_plan = offs < R
    n_new = tl.load(N_NEW + pid_b * tl.num_programs(1) + head)
    src = tl.load(plan + stride_pk + offs, mask=in_plan, other=0).to(tl.int64)
    dst = tl.load(plan + 2 * stride_pk + offs, mask=in_plan, other=0).to(tl.int64)
    need = offs < n_new
    src = tl.where(need, src, 0)  # entries past the plan's length are stale
    dst = tl.where(need, dst, 0)
    _write_dequantised(KC, stride_kcs, stride_kch, KLO, KST, stride_kss, stride_ksh, KOUT, stride_kos, stride_koh,
                       src, dst, head, need, HEAD_DIM, BLOCK_D, BITS, QGROUP)
    _write_dequantised(VC, stride_vcs, stride_vch, VLO, VST, stride_vss, stride_vsh, VOUT, stride_vos, stride_voh,
                       src, dst, head, need, V_DIM, BLOCK_DV, BITS, QGROUP)


def refresh_recall_buffer(selected: torch.Tensor, held: torch.Tensor, tier_table: torch.Tensor, rows: torch.Tensor,
                          tier_lens: torch.Tensor, live: torch.Tensor, buffer_slots: torch.Tensor,
                          k_codes: torch.Tensor, k_lo: torch.Tensor, k_step: torch.Tensor,
                          v_codes: torch.Tensor, v_lo: torch.Tensor, v_step: torch.Tensor,
                          k_buffer: torch.Tensor, v_buffer: torch.Tensor, bits: int, block_w: Optional[int] = None,
                          write_warps: int = 8, counts: Optional[torch.Tensor] = None) -> None:
    """Make each live request's recall buffer hold its selected tier tokens, writing only those
    it does not hold yet (module docstring).

    Args:
        selected: ``[B, Hkv, n]`` indices into each request's tier row (distinct per row and
            head); ``-1`` or past ``tier_lens[b]``: no pick.
        held: ``[rows, Hkv, R]`` int32, one layer's map of the tier column each buffer position
            holds per KV head (-1: none known; set a new buffer's rows to -1); updated here.
        tier_table, rows, tier_lens, live, buffer_slots: as for ``fill_recall_buffer``
            (``buffer_slots`` ``[rows, R]``).
        k_codes .. v_step: one layer's tier; k_buffer, v_buffer: that layer's pool.
        block_w, write_warps: the writes' launch (picks per program, warps per program; default
            16 and 8, the fastest of recall_step_bench.py's sweep on an H200 before the plan
            resolved the slots; a server times WRITE_CANDIDATES at start-up,
            kara_sglang/recall_tune.py ``tune_writes``).
        counts: optional int64 ``[2]``: live requests' picks and the picks written (not held
            yet) are added to it, so ``1 - counts[1] / counts[0]`` is the buffer's hit rate.
    Afterwards, for a live request with ``n`` <= R picks of head ``h``, every pick is held
    at some position ``j`` of its row, and pool slot ``buffer_slots[row, j]`` holds its K and
    V dequantised (head ``h``); nothing else is written. Device work only.
    """
    _check_bits(bits)
    B, Hkv, n_sel = selected.shape
    R = buffer_slots.shape[1]
    D, Dv = k_buffer.shape[2], v_buffer.shape[2]
    _check_dims(D, Dv)
    _check_pool(k_buffer, v_buffer)
    _check_tier(k_codes, k_lo, k_step, D, bits, "K tier")
    _check_tier(v_codes, v_lo, v_step, Dv, bits, "V tier")
    if n_sel > R:
        raise ValueError(f"{n_sel} picks per head for a buffer of {R} slots")
    if held.dtype != torch.int32 or held.shape[1:] != (Hkv, R) or held.stride(2) != 1:
        raise ValueError(f"held must be int32 [rows, {Hkv}, {R}] with unit last stride, got "
                         f"{tuple(held.shape)} {held.dtype}")
    if counts is not None and (counts.dtype != torch.int64 or counts.numel() < 2 or not counts.is_contiguous()):
        raise ValueError(f"counts must be a contiguous int64 tensor of 2, got {tuple(counts.shape)} {counts.dtype}")
    if B == 0 or n_sel == 0:
        return
    if selected.stride(2) != 1:
        selected = selected.contiguous()
    if block_w is None:  # picks written per program; interpreted, fewer and wider programs run faster
        block_w = min(256, triton.next_power_of_2(R)) if interpreting() else 16
    block = triton.next_power_of_2(max(R, n_sel))
    words = -(-tier_table.shape[1] // 32)
    marks = torch.zeros(B, Hkv, 2, words, dtype=torch.int32, device=selected.device)
    # Per request and head: buffer positions, then the writes' tier slots and pool slots.
    plan = torch.empty(B, Hkv, 3, R, dtype=torch.int64, device=selected.device)
    n_new = torch.empty(B, Hkv, dtype=torch.int32, device=selected.device)
    _plan_refresh_kernel[(B, Hkv)](
        selected, selected.stride(0), selected.stride(1), n_sel,
        held, held.stride(0), held.stride(1), R,
        marks, marks.stride(0), marks.stride(1), marks.stride(2),
        plan, plan.stride(0), plan.stride(1), plan.stride(2), n_new,
        rows, tier_lens, live, tier_table, tier_table.stride(0), buffer_slots, buffer_slots.stride(0),
        n_new if counts is None else counts, BLOCK=block, COUNT=counts is not None,
    )
    _write_planned_kernel[(B, Hkv, triton.cdiv(R, block_w))](
        plan, plan.stride(0), plan.stride(1), plan.stride(2), n_new,
        k_codes, k_codes.stride(0), k_codes.stride(1), k_lo, k_step, k_lo.stride(0), k_lo.stride(1),
        v_codes, v_codes.stride(0), v_codes.stride(1), v_lo, v_step, v_lo.stride(0), v_lo.stride(1),
        k_buffer, k_buffer.stride(0), k_buffer.stride(1), v_buffer, v_buffer.stride(0), v_buffer.stride(1), R,
        HEAD_DIM=D, BLOCK_D=_block(D), V_DIM=Dv, BLOCK_DV=_block(Dv), BLOCK_W=block_w, BITS=bits, QGROUP=QUANT_GROUP,
        num_warps=write_warps,
    )
