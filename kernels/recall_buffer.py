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
token sits does not matter. One program per request and KV head, K and V in one launch; device
work only (a CUDA graph replays it).

Why this is safe without a barrier in the second pass: while the picks are written, ``held``
is read for the membership of later picks and written at taken positions by other threads. A
read sees the old column (not among the picks: that is why the position was free) or the new
pick (different from every other pick): either way a later pick is found held exactly when it
was held before the pass.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kara_kernels._buffers import interpreting
from kara_kernels.recall import QUANT_GROUP
from kara_kernels.recall_tier import _block, _check_bits, _check_dims, _check_pool, _check_tier

__all__ = ["refresh_recall_buffer"]


@triton.jit
def _refresh_buffer_kernel(
    SEL, stride_selb, stride_selh, n_sel,
    HELD, stride_hr, stride_hh, FREE, stride_fb, stride_fh, R,
    ROWS, T_LENS, LIVE, TT, stride_tt, BUF, stride_buf,
    KC, stride_kcs, stride_kch, KLO, KST, stride_kss, stride_ksh,
    VC, stride_vcs, stride_vch, VLO, VST, stride_vss, stride_vsh,
    KOUT, stride_kos, stride_koh, VOUT, stride_vos, stride_voh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK: tl.constexpr, BITS: tl.constexpr, QGROUP: tl.constexpr,
):
    pid_b = tl.program_id(0)
    head = tl.program_id(1)
    if tl.load(LIVE + pid_b) != 0:
        row = tl.load(ROWS + pid_b).to(tl.int64)
        n_tier = tl.load(T_LENS + pid_b)
        held = HELD + row * stride_hr + head * stride_hh
        sel = SEL + pid_b.to(tl.int64) * stride_selb + head * stride_selh
        free = FREE + pid_b.to(tl.int64) * stride_fb + head * stride_fh
        offs = tl.arange(0, BLOCK)
        # 1. The positions whose column is not picked, in position order.
        n_free = tl.zeros((), tl.int32)
        for i0 in range(0, R, BLOCK):
            old = tl.load(held + i0 + offs, mask=i0 + offs < R, other=-1)
            stays = tl.zeros((BLOCK,), tl.int32)
            for j0 in range(0, n_sel, BLOCK):
                new = tl.load(sel + j0 + offs, mask=j0 + offs < n_sel, other=-1)
                new = tl.where((new >= 0) & (new < n_tier), new, -1).to(tl.int32)
                match = (old[:, None] == new[None, :]) & (new[None, :] >= 0)
                stays = tl.maximum(stays, tl.max(match.to(tl.int32), axis=1))
            is_free = (i0 + offs < R) & (stays == 0)
            at = n_free + tl.cumsum(is_free.to(tl.int32), 0) - 1
            tl.store(free + at, i0 + offs, mask=is_free)
            n_free += tl.sum(is_free.to(tl.int32), 0)
        tl.debug_barrier()  # the free list, written by all of this program's threads
        # 2. The picks not held take the free positions in order: dequantised into their slot.
        PER_BYTE: tl.constexpr = 8 // BITS
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        n_taken = tl.zeros((), tl.int32)
        for j0 in range(0, n_sel, BLOCK):
            new = tl.load(sel + j0 + offs, mask=j0 + offs < n_sel, other=-1)
            valid = (new >= 0) & (new < n_tier)
            new = tl.where(valid, new, -1).to(tl.int32)
            found = tl.zeros((BLOCK,), tl.int32)
            for i0 in range(0, R, BLOCK):
                old = tl.load(held + i0 + offs, mask=i0 + offs < R, other=-1)
                found = tl.maximum(found, tl.max((new[:, None] == old[None, :]).to(tl.int32), axis=1))
            need = valid & (found == 0)
            k = n_taken + tl.cumsum(need.to(tl.int32), 0) - 1
            need = need & (k < n_free)  # only repeated picks could outnumber the free positions
            pos = tl.load(free + k, mask=need, other=0)
            slot = tl.load(TT + row * stride_tt + new, mask=need, other=0).to(tl.int64)
            dst = tl.load(BUF + row * stride_buf + pos, mask=need, other=0).to(tl.int64)
            mk = need[:, None] & (offs_d < HEAD_DIM)[None, :]
            byte = tl.load(KC + slot[:, None] * stride_kcs + head * stride_kch + (offs_d // PER_BYTE)[None, :],
                           mask=mk, other=0).to(tl.int32)
            code = (byte >> ((offs_d % PER_BYTE) * BITS)[None, :]) & (2 ** BITS - 1)
            s_off = slot[:, None] * stride_kss + head * stride_ksh + (offs_d // QGROUP)[None, :]
            x = (code.to(tl.float32) * tl.load(KST + s_off, mask=mk, other=0.0).to(tl.float32)
                 + tl.load(KLO + s_off, mask=mk, other=0.0).to(tl.float32))
            tl.store(KOUT + dst[:, None] * stride_kos + head * stride_koh + offs_d[None, :],
                     x.to(KOUT.dtype.element_ty), mask=mk)
            mv = need[:, None] & (offs_dv < V_DIM)[None, :]
            byte = tl.load(VC + slot[:, None] * stride_vcs + head * stride_vch + (offs_dv // PER_BYTE)[None, :],
                           mask=mv, other=0).to(tl.int32)
            code = (byte >> ((offs_dv % PER_BYTE) * BITS)[None, :]) & (2 ** BITS - 1)
            s_off = slot[:, None] * stride_vss + head * stride_vsh + (offs_dv // QGROUP)[None, :]
            x = (code.to(tl.float32) * tl.load(VST + s_off, mask=mv, other=0.0).to(tl.float32)
                 + tl.load(VLO + s_off, mask=mv, other=0.0).to(tl.float32))
            tl.store(VOUT + dst[:, None] * stride_vos + head * stride_voh + offs_dv[None, :],
                     x.to(VOUT.dtype.element_ty), mask=mv)
            tl.store(held + pos, new, mask=need)
            n_taken += tl.sum(need.to(tl.int32), 0)


def refresh_recall_buffer(selected: torch.Tensor, held: torch.Tensor, tier_table: torch.Tensor, rows: torch.Tensor,
                          tier_lens: torch.Tensor, live: torch.Tensor, buffer_slots: torch.Tensor,
                          k_codes: torch.Tensor, k_lo: torch.Tensor, k_step: torch.Tensor,
                          v_codes: torch.Tensor, v_lo: torch.Tensor, v_step: torch.Tensor,
                          k_buffer: torch.Tensor, v_buffer: torch.Tensor, bits: int, block: int = 32) -> None:
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
    if B == 0 or n_sel == 0:
        return
    if selected.stride(2) != 1:
        selected = selected.contiguous()
    if interpreting():
        block = max(block, min(256, triton.next_power_of_2(R)))
    free = torch.empty(B, Hkv, R, dtype=torch.int32, device=selected.device)
    _refresh_buffer_kernel[(B, Hkv)](
        selected, selected.stride(0), selected.stride(1), n_sel,
        held, held.stride(0), held.stride(1), free, free.stride(0), free.stride(1), R,
        rows, tier_lens, live, tier_table, tier_table.stride(0), buffer_slots, buffer_slots.stride(0),
        k_codes, k_codes.stride(0), k_codes.stride(1), k_lo, k_step, k_lo.stride(0), k_lo.stride(1),
        v_codes, v_codes.stride(0), v_codes.stride(1), v_lo, v_step, v_lo.stride(0), v_lo.stride(1),
        k_buffer, k_buffer.stride(0), k_buffer.stride(1), v_buffer, v_buffer.stride(0), v_buffer.stride(1),
        HEAD_DIM=D, BLOCK_D=_block(D), V_DIM=Dv, BLOCK_DV=_block(Dv), BLOCK=block, BITS=bits, QGROUP=QUANT_GROUP,
    )
