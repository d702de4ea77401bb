"""Recall kernels: rank a request's evicted tokens by a digest, then attend to resident ∪ selected.

Two launches per layer and decode step (kara_sglang/recall.py calls them):

``rank_evicted``: for every request ``b``, KV head ``h`` and held evicted token ``e``

    rank[b, h, e] = max over the group's query heads g of  q[b, g] . digest(K[slot[b, e], h]) * scale

with ``digest`` the key itself (``bits = 0``) or the key rounded per token and head to
``bits`` bits between each group of 32 channels' min and max (what a low-bit key digest
holds). Keys are read in place, by slot, from SGLang's K buffer; the digest is computed in
registers, so no second copy of the keys exists.

``recall_decode``: for every request and query head, one online softmax over the request's
resident tokens (its ``req_to_token`` row up to its length) followed by the ``R`` evicted
tokens selected for the head's KV head (indices into the request's evicted row; ``-1``
marks no token), the selected tokens' K and V optionally rounded to ``kv_bits`` the same
way (what a low-precision GPU tier of evicted KV would give back). Float32 throughout: the emulation decides answers, not speed records.

Both read request rows through a row index (``rows``), so the per-layer call copies no slot
table. Device functions are avoided (each call costs milliseconds under Triton's CPU
interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.standard import _elementwise_max as _max_combine
from triton.language.standard import _elementwise_min as _min_combine
from triton.language.standard import _sum_combine

from kara_kernels._buffers import interpreting

LOG2E = 1.4426950408889634
QUANT_GROUP = 32  # channels per min/max pair of a low-bit key digest


@triton.jit
def _rank_kernel(
    Q, stride_qb, stride_qh,
    K, stride_ks, stride_kh,
    EV, stride_ev, ROWS, EV_LENS,
    OUT, stride_ob, stride_oh,
    n_cols, scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
    BITS: tl.constexpr, QGROUP: tl.constexpr,
):
    pid_b = tl.program_id(0)
    kv_head = tl.program_id(1)
    offs_e = tl.program_id(2) * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    n_ev = tl.load(EV_LENS + pid_b)
    valid = offs_e < n_ev
    row = tl.load(ROWS + pid_b).to(tl.int64)
    slots = tl.load(EV + row * stride_ev + offs_e, mask=valid, other=0).to(tl.int64)
    k = tl.load(K + slots[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :],
                mask=valid[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    if BITS > 0:
        # Padding channels form whole groups of their own (HEAD_DIM is a multiple of QGROUP)
        # and meet zero query channels, so they add nothing.
        g = tl.reshape(k, (BLOCK_E, BLOCK_D // QGROUP, QGROUP))
        lo = tl.reduce(g, 2, _min_combine)
        hi = tl.reduce(g, 2, _max_combine)
        step = tl.maximum(hi - lo, 1e-8) / (2 ** BITS - 1)
        g = tl.floor((g - lo[:, :, None]) / step[:, :, None] + 0.5) * step[:, :, None] + lo[:, :, None]
        k = tl.reshape(g, (BLOCK_E, BLOCK_D))
    best = tl.full([BLOCK_E], float("-inf"), dtype=tl.float32)
    for g_i in tl.static_range(GROUP):
        q = tl.load(Q + pid_b.to(tl.int64) * stride_qb + (kv_head * GROUP + g_i) * stride_qh + offs_d,
                    mask=d_ok, other=0.0).to(tl.float32)
        best = tl.maximum(best, tl.reduce(q[None, :] * k, 1, _sum_combine))
    out = OUT + pid_b.to(tl.int64) * stride_ob + kv_head * stride_oh
    tl.store(out + offs_e, tl.where(valid, best * scale, float("-inf")), mask=offs_e < n_cols)


@triton.jit
def _recall_decode_kernel(
    Q, stride_qb, stride_qh,
    K, stride_ks, stride_kh, V, stride_vs, stride_vh,
    RES, stride_res, RES_LENS,
    EV, stride_ev, ROWS,
    SEL, stride_selb, stride_selh, n_sel,
    OUT, stride_ob, stride_oh,
    qk_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
    KV_BITS: tl.constexpr, QGROUP: tl.constexpr,
):
    pid_b = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < V_DIM
    q = tl.load(Q + pid_b.to(tl.int64) * stride_qb + head * stride_qh + offs_d,
                mask=d_ok, other=0.0).to(tl.float32)
    row = tl.load(ROWS + pid_b).to(tl.int64)
    res_row = RES + row * stride_res
    ev_row = EV + row * stride_ev
    sel_row = SEL + pid_b.to(tl.int64) * stride_selb + kv_head * stride_selh
    n_res = tl.load(RES_LENS + pid_b)

    # One online softmax (log2 domain) over [resident tokens | selected evicted tokens]:
    # a block may straddle the two, each position reads its slot from its own table.
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for start in range(0, n_res + n_sel, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        is_res = offs < n_res
        in_sel = (offs >= n_res) & (offs < n_res + n_sel)
        pick = tl.load(sel_row + (offs - n_res), mask=in_sel, other=-1)
        is_sel = in_sel & (pick >= 0)
        res_slot = tl.load(res_row + offs, mask=is_res, other=0).to(tl.int64)
        ev_slot = tl.load(ev_row + pick, mask=is_sel, other=0).to(tl.int64)
        valid = is_res | is_sel
        slots = tl.where(is_res, res_slot, ev_slot)
        k = tl.load(K + slots[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :],
                    mask=valid[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        v = tl.load(V + slots[:, None] * stride_vs + kv_head * stride_vh + offs_dv[None, :],
                    mask=valid[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
        if KV_BITS > 0:
            # Recalled tokens are attended as a low-precision tier would hold them: K and V
            # rounded per token to KV_BITS between each group of QGROUP channels' min and max.
            gk = tl.reshape(k, (BLOCK_N, BLOCK_D // QGROUP, QGROUP))
            lo = tl.reduce(gk, 2, _min_combine)
            step = tl.maximum(tl.reduce(gk, 2, _max_combine) - lo, 1e-8) / (2 ** KV_BITS - 1)
            gk = tl.floor((gk - lo[:, :, None]) / step[:, :, None] + 0.5) * step[:, :, None] + lo[:, :, None]
            k = tl.where(is_sel[:, None], tl.reshape(gk, (BLOCK_N, BLOCK_D)), k)
            gv = tl.reshape(v, (BLOCK_N, BLOCK_DV // QGROUP, QGROUP))
            lo = tl.reduce(gv, 2, _min_combine)
            step = tl.maximum(tl.reduce(gv, 2, _max_combine) - lo, 1e-8) / (2 ** KV_BITS - 1)
            gv = tl.floor((gv - lo[:, :, None]) / step[:, :, None] + 0.5) * step[:, :, None] + lo[:, :, None]
            v = tl.where(is_sel[:, None], tl.reshape(gv, (BLOCK_N, BLOCK_DV)), v)
        s = tl.where(valid, tl.reduce(q[None, :] * k, 1, _sum_combine) * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 0, _max_combine))
        # A block with no valid token before any valid one keeps the state at its start.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe)
        l_i = l_i * alpha + tl.reduce(p, 0, _sum_combine)
        acc = acc * alpha + tl.reduce(p[:, None] * v, 0, _sum_combine)
        m_i = m_new
    out = OUT + pid_b.to(tl.int64) * stride_ob + head * stride_oh
    tl.store(out + offs_dv, acc / l_i, mask=dv_ok)


def rank_evicted(queries: torch.Tensor, k_buffer: torch.Tensor, evicted_table: torch.Tensor,
                 rows: torch.Tensor, evicted_lens: torch.Tensor, n_cols: int, bits: int,
                 sm_scale: float, block_e: int = 64) -> torch.Tensor:
    """Digest score of each request's evicted tokens per KV head, ``-inf`` past its count.

    Args:
        queries: ``[B, Hq, D]`` the ranking queries.
        k_buffer: ``[slots, Hkv, D]`` one layer's K buffer.
        evicted_table: ``[rows, capacity]`` evicted slots per ``req_to_token`` row.
        rows, evicted_lens: ``[B]`` each request's row and evicted-token count.
        n_cols: columns of the result (at least the longest count).
        bits: 0 ranks by the keys themselves, 2-4 by keys rounded to that many bits.
    Returns:
        ``[B, Hkv, n_cols]`` float32.
    """
    B, Hq, D = queries.shape
    Hkv = k_buffer.shape[1]
    if bits and D % QUANT_GROUP:
        raise ValueError(f"a {bits}-bit digest needs head_dim divisible by {QUANT_GROUP}, got {D}")
    out = torch.empty(B, Hkv, n_cols, dtype=torch.float32, device=queries.device)
    if B == 0 or n_cols == 0:
        return out
    if interpreting():  # the CPU interpreter pays per program: fewer, larger blocks
        block_e = max(block_e, min(1024, triton.next_power_of_2(n_cols)))
    block_d = max(QUANT_GROUP, triton.next_power_of_2(D))
    grid = (B, Hkv, triton.cdiv(n_cols, block_e))
    _rank_kernel[grid](
        queries, queries.stride(0), queries.stride(1),
        k_buffer, k_buffer.stride(0), k_buffer.stride(1),
        evicted_table, evicted_table.stride(0), rows, evicted_lens,
        out, out.stride(0), out.stride(1),
        n_cols, sm_scale,
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=block_d, BLOCK_E=block_e, BITS=bits, QGROUP=QUANT_GROUP,
    )
    return out


def recall_decode(queries: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                  resident_table: torch.Tensor, resident_lens: torch.Tensor,
                  evicted_table: torch.Tensor, rows: torch.Tensor, selected: torch.Tensor,
                  sm_scale: float, kv_bits: int = 0, block_n: int = 32) -> torch.Tensor:
    """Attention of each request's query heads over its resident tokens and selected evicted ones.

    Args:
        queries: ``[B, Hq, D]``.
        k_buffer, v_buffer: ``[slots, Hkv, D]`` / ``[slots, Hkv, Dv]`` one layer's pool.
        resident_table: ``[rows, columns]`` resident slots per row (``req_to_token``), valid
            below ``resident_lens`` (``[B]``).
        evicted_table, rows: as for :func:`rank_evicted`.
        selected: ``[B, Hkv, R]`` indices into the request's evicted row, ``-1`` for none.
        kv_bits: 0 attends to the selected tokens' K and V as stored; 2-8 to both rounded to
            that many bits per token and group of 32 channels (resident tokens stay exact).
    Returns:
        ``[B, Hq, Dv]`` float32.
    """
    B, Hq, D = queries.shape
    Hkv, Dv = k_buffer.shape[1], v_buffer.shape[2]
    if kv_bits and (D % QUANT_GROUP or Dv % QUANT_GROUP):
        raise ValueError(f"{kv_bits}-bit recalled KV needs head dims divisible by {QUANT_GROUP}, got {D}/{Dv}")
    out = torch.empty(B, Hq, Dv, dtype=torch.float32, device=queries.device)
    if B == 0:
        return out
    if interpreting():
        block_n = max(block_n, 128)
    _recall_decode_kernel[(B, Hq)](
        queries, queries.stride(0), queries.stride(1),
        k_buffer, k_buffer.stride(0), k_buffer.stride(1), v_buffer, v_buffer.stride(0), v_buffer.stride(1),
        resident_table, resident_table.stride(0), resident_lens,
        evicted_table, evicted_table.stride(0), rows,
        selected, selected.stride(0), selected.stride(1), selected.shape[2],
        out, out.stride(0), out.stride(1),
        sm_scale * LOG2E,
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=max(QUANT_GROUP, triton.next_power_of_2(D)),
        V_DIM=Dv, BLOCK_DV=max(QUANT_GROUP, triton.next_power_of_2(Dv)), BLOCK_N=block_n,
        KV_BITS=kv_bits, QGROUP=QUANT_GROUP,
    )
    return out
