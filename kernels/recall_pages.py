"""Two-stage ranking of a recall tier: pages first, then the tokens of the best pages.

kernels/recall_tier.py's ``rank_tier`` scores every tier token of a request at every decode
step and layer; on an H200 that work, not the bytes it reads, bounds the tier's speed
(docs/accuracy.md, "The GPU tier"). The probe (benchmarks/reasoning/recall_probe.py,
``quest16+bits4``) showed that ranking only the tokens of the best Quest pages keeps the
answers, where ranking less often does not. Here:

- ``page_bounds``: per page of ``PAGE`` consecutive columns of a request's tier row, KV head
  and channel, the max and min of its tokens' dequantised keys (float16, ``[bound pages, Hkv,
  D]`` per layer; ``page_table[row, p]`` names the bound page of the row's p-th page, so bounds
  take memory only for pages in use). A page's bounds are computed from the tokens it holds
  when called; the caller recomputes a page whose tokens change (a compression appending to a
  row's last page).
- ``rank_pages``: Quest's upper bound of q . k over a page, ``sum_d max(q_d hi_d, q_d lo_d)``
  (max over the GQA group), written as two matrix products, ``q+ . hi + q- . lo`` with
  ``q+ = max(q, 0)`` and ``q- = min(q, 0)``, so it runs on the tensor cores.
- ``select_two_stage``: the best pages per KV head, then ``rank_tier`` over their tokens only,
  then the top R of those, returned as columns of the row (what ``fill_recall_buffer`` takes).
  Fused, each ranking kernel also selects (kernels/select_top.py's radix selection over the
  scores it just wrote): two launches a layer, where separate selections and the mapping of
  picks back to columns took about ten small ones, a fixed cost a CUDA graph does not remove.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch
import triton
import triton.language as tl

from kara_kernels._buffers import interpreting
from kara_kernels.recall import QUANT_GROUP
from kara_kernels.recall_tier import (_block, _check_bits, _check_dims, _check_tier, _selection_blocks, dequant_tokens,
                                      rank_tier)
from kara_kernels.select_top import top_columns, top_of_row, top_of_row_sorted

PAGE = 16

__all__ = ["PAGE", "page_bounds", "rank_pages", "select_two_stage"]


@triton.jit
def _page_bounds_kernel(
    KC, stride_kcs, stride_kch, KLO, KST, stride_kss, stride_ksh,
    TT, stride_tt, ROWS, T_LENS, FIRST, END, PT, stride_pt,
    HI, LO, stride_bp, stride_bh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr, QGROUP: tl.constexpr, PAGE: tl.constexpr,
):
    """Pages ``FIRST[i] .. END[i]`` of row ``ROWS[i]``, one KV head: max and min of the
    dequantised keys of each page's columns below the count."""
    i = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(ROWS + i).to(tl.int64)
    n_tier = tl.load(T_LENS + i)
    offs_c = tl.arange(0, PAGE)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    for p in range(tl.load(FIRST + i), tl.load(END + i)):
        cols = p * PAGE + offs_c
        valid = cols < n_tier
        slots = tl.load(TT + row * stride_tt + cols, mask=valid, other=0).to(tl.int64)
        mask = valid[:, None] & d_ok[None, :]
        k = dequant_tokens(KC, stride_kcs, stride_kch, KLO, KST, stride_kss, stride_ksh, slots, head, offs_d, mask,
                           BITS, QGROUP)
        hi = tl.max(tl.where(mask, k, float("-inf")), axis=0)
        lo = tl.min(tl.where(mask, k, float("inf")), axis=0)
        any_valid = p * PAGE < n_tier
        bound = tl.load(PT + row * stride_pt + p).to(tl.int64)
        out = bound * stride_bp + head * stride_bh + offs_d
        # A page with no token (never ranked: past the count) gets 0, not an infinity.
        tl.store(HI + out, tl.where(any_valid, hi, 0.0).to(tl.float16), mask=d_ok)
        tl.store(LO + out, tl.where(any_valid, lo, 0.0).to(tl.float16), mask=d_ok)


@triton.jit
def _rank_pages_kernel(
    Q, stride_qb, stride_qh,
    HI, LO, stride_bp, stride_bh, PT, stride_pt,
    ROWS, T_LENS,
    OUT, stride_ob, stride_oh,
    SEL, stride_sb, stride_sh, n_top,
    n_pages, scale,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr, PAGE: tl.constexpr, DOT16: tl.constexpr, TOP: tl.constexpr, BLOCK_SEL: tl.constexpr,
    SORTED_TOP: tl.constexpr, K_TOP: tl.constexpr,
):
    """Blocks of a request's pages for one KV head: ``max_g (q+ . hi + q- . lo) * scale``.

    Program ``s`` of the grid's third dimension takes blocks ``s, s + programs, ...``. With
    ``TOP`` (one program per request and KV head) the scores are scratch: only the row's own
    pages are scored, then the same program writes the ``n_top`` best pages to ``SEL``
    (select_top's semantics), so the selection costs no launch and no pass over memory of
    its own."""
    pid_b = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(ROWS + pid_b).to(tl.int64)
    n_row = tl.minimum(tl.cdiv(tl.load(T_LENS + pid_b), PAGE), n_pages)
    offs_d = tl.arange(0, BLOCK_D)
    offs_h = tl.arange(0, G_PAD)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + pid_b.to(tl.int64) * stride_qb + (head * GROUP + offs_h)[None, :] * stride_qh
                + offs_d[:, None], mask=d_ok[:, None] & (offs_h < GROUP)[None, :], other=0.0).to(tl.float32)
    q_pos = tl.maximum(q, 0.0)
    q_neg = tl.minimum(q, 0.0)
    out = OUT + pid_b.to(tl.int64) * stride_ob + head * stride_oh
    end = n_row if TOP else n_pages
    for start in range(tl.program_id(2) * BLOCK_P, end, tl.num_programs(2) * BLOCK_P):
        offs_p = start + tl.arange(0, BLOCK_P)
        valid = offs_p < n_row
        bound = tl.load(PT + row * stride_pt + offs_p, mask=valid, other=0).to(tl.int64)
        b_off = bound[:, None] * stride_bp + head * stride_bh + offs_d[None, :]
        mask = valid[:, None] & d_ok[None, :]
        hi = tl.load(HI + b_off, mask=mask, other=0.0)
        lo = tl.load(LO + b_off, mask=mask, other=0.0)
        if DOT16:
            score = tl.dot(hi, q_pos.to(tl.float16), out_dtype=tl.float32)
            score += tl.dot(lo, q_neg.to(tl.float16), out_dtype=tl.float32)
        else:
            score = tl.dot(hi.to(tl.float32), q_pos, input_precision="ieee")
            score += tl.dot(lo.to(tl.float32), q_neg, input_precision="ieee")
        best = tl.max(tl.where((offs_h < GROUP)[None, :], score, float("-inf")), axis=1)
        tl.store(out + offs_p, tl.where(valid, best * scale, float("-inf")), mask=offs_p < end)
    if TOP:
        tl.debug_barrier()  # the row's scores, written by all of this program's threads
        sel = SEL + pid_b.to(tl.int64) * stride_sb + head * stride_sh
        if SORTED_TOP:
            top_of_row_sorted(out, n_row, n_top, sel, PT, 0, BLOCK_SEL, K_TOP)
        else:
            top_of_row(out, n_row, n_top, sel, PT, 0, BLOCK_SEL, 16)


def _check_bounds(page_hi: torch.Tensor, page_lo: torch.Tensor, page_table: torch.Tensor, Hkv: int, D: int) -> None:
    if (page_hi.dtype != torch.float16 or page_hi.shape != page_lo.shape or page_hi.stride() != page_lo.stride()
            or page_hi.dim() != 3 or page_hi.shape[1:] != (Hkv, D) or page_hi.stride(2) != 1):
        raise ValueError(f"page bounds must be two float16 [bound pages, {Hkv}, {D}] tensors of one layout, "
                         f"got {tuple(page_hi.shape)} {page_hi.dtype} / {tuple(page_lo.shape)}")
    if page_table.dim() != 2 or page_table.stride(1) != 1 or page_table.is_floating_point():
        raise ValueError(f"the page table must be an integer [rows, pages] tensor, got {tuple(page_table.shape)}")


def page_bounds(k_codes: torch.Tensor, k_lo: torch.Tensor, k_step: torch.Tensor, tier_table: torch.Tensor,
                rows: torch.Tensor, tier_lens: torch.Tensor, first_page: torch.Tensor, end_page: torch.Tensor,
                bits: int, page_table: torch.Tensor, page_hi: torch.Tensor, page_lo: torch.Tensor) -> None:
    """Write pages ``first_page[i] .. end_page[i] - 1`` of row ``rows[i]`` (tier count
    ``tier_lens[i]``): per KV head and channel the max / min of the page's dequantised keys,
    rounded to float16 (so within float16 rounding of a bound). Other pages are untouched.

    Args:
        k_codes, k_lo, k_step: one layer's K tier; tier_table: ``[rows, capacity]`` tier slots.
        page_table: ``[rows, capacity // PAGE (rounded up)]`` the bound page of each row's page
            (those written must be set).
        page_hi, page_lo: ``[bound pages, Hkv, D]`` float16, one layer.
    """
    _check_bits(bits)
    Hkv, D = k_codes.shape[1], k_lo.shape[-1] * QUANT_GROUP
    _check_dims(D, D)
    _check_tier(k_codes, k_lo, k_step, D, bits, "K tier")
    _check_bounds(page_hi, page_lo, page_table, Hkv, D)
    n = rows.numel()
    if n == 0:
        return
    _page_bounds_kernel[(n, Hkv)](
        k_codes, k_codes.stride(0), k_codes.stride(1), k_lo, k_step, k_lo.stride(0), k_lo.stride(1),
        tier_table, tier_table.stride(0), rows, tier_lens, first_page, end_page, page_table, page_table.stride(0),
        page_hi, page_lo, page_hi.stride(0), page_hi.stride(1),
        HEAD_DIM=D, BLOCK_D=_block(D), BITS=bits, QGROUP=QUANT_GROUP, PAGE=PAGE,
    )


def rank_pages(queries: torch.Tensor, page_table: torch.Tensor, page_hi: torch.Tensor, page_lo: torch.Tensor,
               rows: torch.Tensor, tier_lens: torch.Tensor, n_pages: int, sm_scale: float,
               block_p: Optional[int] = None, num_warps: int = 4, top: int = 0,
               sorted_top: bool = False) -> torch.Tensor:
    """``[B, Hkv, n_pages]`` float32: each page's bound of ``max_g q_g . k * sm_scale`` over its
    tokens, -inf for pages past ``ceil(tier_lens[b] / PAGE)``. Device work only (CUDA graphs).

    ``top`` > 0: instead ``[B, Hkv, min(top, n_pages)]`` int64, the ``top`` best pages of each
    row (as ``select_top`` of the scores picks them: column order, then -1), selected in the
    kernel that scores them (one program per request and KV head).

    ``block_p``: pages per block, default 64 (fastest on an H200, two_stage_bench.py, though
    ptxas reports 88 B spilled at 4 warps), 32 with ``top`` (the selection's registers on top
    of 64 spill more; 32 spills nothing, benchmarks/kernel_resources.py). ``sorted_top``: the
    selection by ``top_of_row_sorted`` (the same picks, rows up to ``SORTED_MAX_COLS`` pages)."""
    B, Hq, D = queries.shape
    Hkv = page_hi.shape[1]
    _check_bounds(page_hi, page_lo, page_table, Hkv, D)
    scores = torch.empty(B, Hkv, n_pages, dtype=torch.float32, device=queries.device)
    top = min(top, n_pages)
    sel = torch.empty(B, Hkv, top, dtype=torch.int64, device=queries.device) if top else scores
    if B == 0 or n_pages == 0:
        return sel
    if queries.stride(2) != 1:
        queries = queries.contiguous()
    if block_p is None:
        block_p = 32 if top else 64
    if interpreting():
        block_p = max(block_p, min(1024, triton.next_power_of_2(n_pages)))
    group = Hq // Hkv
    dot16 = queries.dtype in (torch.bfloat16, torch.float16) and not interpreting()
    block_sel, k_top = _selection_blocks(n_pages, top, sorted_top)
    _rank_pages_kernel[(B, Hkv, 1 if top else triton.cdiv(n_pages, block_p))](
        queries, queries.stride(0), queries.stride(1),
        page_hi, page_lo, page_hi.stride(0), page_hi.stride(1), page_table, page_table.stride(0),
        rows, tier_lens, scores, scores.stride(0), scores.stride(1), sel, sel.stride(0), sel.stride(1), top,
        n_pages, sm_scale,
        GROUP=group, G_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, BLOCK_D=_block(D),
        BLOCK_P=block_p, PAGE=PAGE, DOT16=dot16, TOP=bool(top),
        BLOCK_SEL=block_sel, SORTED_TOP=sorted_top and bool(top), K_TOP=k_top, num_warps=num_warps,
    )
    return sel


def select_two_stage(queries: torch.Tensor, k_tier: Sequence[torch.Tensor], tier_table: torch.Tensor,
                     rows: torch.Tensor, tier_lens: torch.Tensor, page_table: torch.Tensor, page_hi: torch.Tensor,
                     page_lo: torch.Tensor, n_pages: int, pages_kept: int, tokens: int, bits: int, sm_scale: float,
                     select: str = "torch", rank_kwargs: Optional[Dict] = None) -> torch.Tensor:
    """``[B, Hkv, R']`` columns of each row (-1: none), R' = min(tokens, kept pages' columns):
    the ``pages_kept`` best pages by :func:`rank_pages`, then the ``tokens`` best of their
    tokens by ``rank_tier``; when the kept pages hold no more than ``tokens`` columns, all of
    their tokens without the second ranking (Quest's selection alone). With every page kept it
    selects what ``rank_tier`` over the whole row selects. Device work only, shapes fixed by
    ``n_pages`` (CUDA graphs).

    ``select``: how each stage picks its best: ``torch`` (torch.topk) or ``radix`` (the radix
    kernel, kernels/select_top.py) after each ranking, or inside each ranking kernel (two
    launches in all, nothing else; the same picks as ``radix``): ``fused`` by the radix
    selection, ``sorted`` by the sorted one (rows up to ``SORTED_MAX_COLS`` pages)."""
    kept = min(pages_kept, n_pages)
    in_kernel = select in ("fused", "sorted")
    if in_kernel:
        chosen = rank_pages(queries, page_table, page_hi, page_lo, rows, tier_lens, n_pages, sm_scale, top=kept,
                            sorted_top=select == "sorted")
    else:
        page_rank = rank_pages(queries, page_table, page_hi, page_lo, rows, tier_lens, n_pages, sm_scale)
        chosen = top_columns(page_rank, (tier_lens + PAGE - 1) // PAGE, kept, n_pages, select).contiguous()
    if kept * PAGE <= tokens:  # the kept pages' tokens all fit: no second ranking, every token of them
        cols = (chosen.unsqueeze(-1) * PAGE + torch.arange(PAGE, device=chosen.device)).flatten(-2)
        dead = (chosen < 0).repeat_interleave(PAGE, -1) | (cols >= tier_lens.view(-1, 1, 1))
        return cols.masked_fill(dead, -1)
    if in_kernel:
        return rank_tier(queries, *k_tier, tier_table, rows, tier_lens, kept * PAGE, bits, sm_scale,
                         pages=chosen, page=PAGE, top=tokens, sorted_top=select == "sorted", **(rank_kwargs or {}))
    n_cand = kept * PAGE
    cand = rank_tier(queries, *k_tier, tier_table, rows, tier_lens, n_cand, bits, sm_scale,
                     pages=chosen, page=PAGE, **(rank_kwargs or {}))
    pick = top_columns(cand, torch.full_like(tier_lens, n_cand), tokens, n_cand, select)
    safe = pick.clamp(min=0)
    page_of = chosen.gather(-1, safe // PAGE)
    cols = page_of * PAGE + safe % PAGE
    dead = (pick < 0) | (page_of < 0) | (cand.gather(-1, safe) == float("-inf"))
    return cols.masked_fill(dead, -1)
