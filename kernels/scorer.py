"""Bidirectional window scorer: per-key importance from the captured window queries.

For every window ``b``, voting layer ``l``, stored query head ``h`` and query ``q``:

    p[q, j] = softmax_j( Q[b, l, q, h] . K_l[slot[b, j], h // R] * sm_scale )   (no causal mask)
    importance[b, j] += sum over l, h, q of p[q, j]

``K_l`` is SGLang's K buffer of layer ``l`` (``[num_slots, kv_heads, head_dim]``), read in
place by slot index; the queries are read in place from the query buffer. One launch covers
every window and every voting layer. Each program owns one block of queries of one head and
one layer: pass 1 finds the row log-sum-exp over all keys (online, like FlashAttention),
pass 2 recomputes the scores and adds the probabilities' column sums into ``importance``
(float32 atomics: the sum order may vary between runs, within float32 rounding).

A head dim that is not a power of two (MLA's latent: kv_lora_rank + rope dims, 512 + 64) is
read as two power-of-two column blocks, the largest power of two that fits (``MAIN_DIM``) and
the rest padded to a power of two (``TAIL_DIM``, masked, 0 when none): one more dot per key
block instead of padding the whole row to the next power of two (576 -> 1024).

Triton 3.6's CPU interpreter computes bf16 ``tl.dot`` wrongly, so under
``TRITON_INTERPRET=1`` bf16 operands are upcast to float32 for the dot (``DOT_F32``); on
the GPU the dot takes bf16 operands with float32 accumulation.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from kara_kernels._buffers import buffer_offsets, interpreting
# tl.sum / tl.max of float32 are these reductions (triton.language.standard). Called through
# tl.reduce they run as one NumPy call under Triton's CPU interpreter; tl.sum / tl.max are
# device functions there, and each call re-patches triton.language (milliseconds).
from triton.language.standard import _elementwise_max as _max_combine
from triton.language.standard import _sum_combine

LOG2E = 1.4426950408889634


@triton.jit
def _window_score_kernel(
    Q, stride_qr, stride_ql, stride_qn, stride_qh,
    Q_ROWS,
    K_BASE, K_OFFSETS, stride_ks, stride_kh,
    SLOTS, stride_sb,
    OUT, stride_ob,
    n_queries, n_keys, num_q_heads, qk_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, MAIN_DIM: tl.constexpr, TAIL_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_lh = tl.program_id(1)
    pid_q = tl.program_id(2)
    layer = pid_lh // num_q_heads
    head = pid_lh % num_q_heads
    kv_head = head // GROUP

    q_row = tl.load(Q_ROWS + pid_b).to(tl.int64)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, MAIN_DIM)
    q_valid = offs_q < n_queries
    q_base = (Q + q_row * stride_qr + layer * stride_ql + head * stride_qh
              + offs_q[:, None].to(tl.int64) * stride_qn)
    q = tl.load(q_base + offs_d[None, :], mask=q_valid[:, None], other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    # The tail columns (a head dim that is not a power of two): padding columns read as 0.
    # (A constexpr branch: Triton compiles only the taken one, its names stay in scope.)
    if TAIL_DIM > 0:
        offs_t = MAIN_DIM + tl.arange(0, TAIL_DIM)
        t_valid = offs_t < HEAD_DIM
        q_t = tl.load(q_base + offs_t[None, :], mask=q_valid[:, None] & t_valid[None, :], other=0.0)
        if DOT_F32:
            q_t = q_t.to(tl.float32)

    k_layer = K_BASE + tl.load(K_OFFSETS + layer) + kv_head * stride_kh
    slot_row = SLOTS + pid_b.to(tl.int64) * stride_sb

    # Pass 1: log2-sum-exp of every query row over all keys.
    m_i = tl.full([BLOCK_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_Q], dtype=tl.float32)
    # The key-block load is written out in both passes, not a helper: under Triton's CPU
    # interpreter every device-function call re-patches triton.language (milliseconds each).
    for start in range(0, n_keys, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        k_valid = offs_k < n_keys
        slots = tl.load(slot_row + offs_k, mask=k_valid, other=0).to(tl.int64)
        k = tl.load(k_layer + slots[:, None] * stride_ks + offs_d[None, :], mask=k_valid[:, None], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if TAIL_DIM > 0:
            k_t = tl.load(k_layer + slots[:, None] * stride_ks + offs_t[None, :],
                          mask=k_valid[:, None] & t_valid[None, :], other=0.0)
            if DOT_F32:
                k_t = k_t.to(tl.float32)
            s = tl.dot(q_t, tl.trans(k_t), s, input_precision=DOT_PRECISION)
        if not EVEN_K:
            s = tl.where(k_valid[None, :], s, float("-inf"))
        # The scale is applied to the row max and inside one FMA with the subtraction: per
        # score element this pass costs a max, an FMA, an exp2 and an add.
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _max_combine) * qk_scale_log2)
        l_i = l_i * tl.math.exp2(m_i - m_new) + tl.reduce(
            tl.math.exp2(s * qk_scale_log2 - m_new[:, None]), 1, _sum_combine)
        m_i = m_new
    # Padding query rows get +inf so their probabilities in pass 2 are exactly 0.
    lse = tl.where(q_valid, m_i + tl.math.log2(l_i), float("inf"))

    # Pass 2: probabilities, summed over this block's queries, added per key. Scores are
    # computed transposed (keys x queries) so the per-key sum runs along rows, which stays
    # inside a warp's registers instead of crossing warps through shared memory.
    out_row = OUT + pid_b.to(tl.int64) * stride_ob
    for start in range(0, n_keys, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        k_valid = offs_k < n_keys
        slots = tl.load(slot_row + offs_k, mask=k_valid, other=0).to(tl.int64)
        k = tl.load(k_layer + slots[:, None] * stride_ks + offs_d[None, :], mask=k_valid[:, None], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        if TAIL_DIM > 0:
            k_t = tl.load(k_layer + slots[:, None] * stride_ks + offs_t[None, :],
                          mask=k_valid[:, None] & t_valid[None, :], other=0.0)
            if DOT_F32:
                k_t = k_t.to(tl.float32)
            s_t = tl.dot(k_t, tl.trans(q_t), s_t, input_precision=DOT_PRECISION)
        p_t = tl.math.exp2(s_t * qk_scale_log2 - lse[None, :])
        # Padding key rows are dropped by the store mask, not per element.
        tl.atomic_add(out_row + offs_k, tl.reduce(p_t, 1, _sum_combine), mask=k_valid)


def split_head_dim(head_dim: int) -> tuple:
    """``(MAIN_DIM, TAIL_DIM)``: the largest power of two in ``head_dim`` and the rest padded to
    a power of two of at least 16 (``tl.dot``'s smallest operand), or 0 when nothing is left."""
    main = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - main
    return main, (max(16, triton.next_power_of_2(rest)) if rest else 0)


def window_scores(
    queries: torch.Tensor,
    query_rows: torch.Tensor,
    k_buffers: Sequence[torch.Tensor],
    key_slots: torch.Tensor,
    sm_scale: float,
    out: torch.Tensor | None = None,
    block_q: int = 128,
    block_k: int = 128,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Importance of every window key, summed over voting layers, heads and queries.

    Args:
        queries: query buffer ``[rows, n_vote_layers, n_queries, q_heads, head_dim]``
            (bf16/fp16); every one of the ``n_queries`` entries of a used row is valid.
        query_rows: ``[B]`` int row of each window in ``queries``.
        k_buffers: the ``n_vote_layers`` K buffers, each ``[num_slots, kv_heads, head_dim]``,
            in the order of the query buffer's layer axis.
        key_slots: ``[B, n_keys]`` int slot of each window key.
        sm_scale: softmax scale (``1 / sqrt(head_dim)`` for standard attention).
        out: optional ``[B, n_keys]`` float32 to accumulate into; zeroed here if ``None``.

    Returns:
        ``[B, n_keys]`` float32; each window's row sums to ``n_vote * q_heads * n_queries``.
    """
    n_rows, n_vote, n_queries, q_heads, head_dim = queries.shape
    kv_heads = k_buffers[0].shape[1]
    if len(k_buffers) != n_vote:
        raise ValueError(f"{len(k_buffers)} K buffers for {n_vote} voting layers")
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads do not group over {kv_heads} KV heads")
    if queries.stride(-1) != 1 or any(k.stride(-1) != 1 for k in k_buffers):
        raise ValueError("head_dim must be the innermost, contiguous axis")
    if head_dim < 16:
        raise ValueError(f"head_dim must be at least 16, got {head_dim}")
    main_dim, tail_dim = split_head_dim(head_dim)
    n_windows, n_keys = key_slots.shape
    if out is None:
        out = torch.zeros(n_windows, n_keys, dtype=torch.float32, device=key_slots.device)
    if n_windows == 0:
        return out
    k_base, k_offsets = buffer_offsets(k_buffers)
    stride_ks, stride_kh = k_buffers[0].stride(0), k_buffers[0].stride(1)
    if any(k.stride()[:2] != (stride_ks, stride_kh) for k in k_buffers):
        raise ValueError("all K buffers must share one layout")
    upcast = interpreting() and queries.dtype == torch.bfloat16
    if interpreting():
        # The CPU interpreter runs every padded row: blocks no larger than the window (on a
        # GPU the tuned 128 x 128 tiles stay; tests run both sizes).
        block_q = min(block_q, max(16, triton.next_power_of_2(n_queries)))
        block_k = min(block_k, max(16, triton.next_power_of_2(n_keys)))
    elif head_dim > 256:
        # MLA's 576-wide latent: 128-row tiles of it would not fit a GPU's registers.
        block_q, block_k = min(block_q, 64), min(block_k, 64)
    grid = (n_windows, n_vote * q_heads, triton.cdiv(n_queries, block_q))
    _window_score_kernel[grid](
        queries, *queries.stride()[:4],
        query_rows,
        k_base, k_offsets, stride_ks, stride_kh,
        key_slots, key_slots.stride(0),
        out, out.stride(0),
        n_queries, n_keys, q_heads, sm_scale * LOG2E,
        GROUP=q_heads // kv_heads, HEAD_DIM=head_dim, MAIN_DIM=main_dim, TAIL_DIM=tail_dim,
        BLOCK_Q=block_q, BLOCK_K=block_k, DOT_F32=upcast,
        # float32 inputs get exact float32 products (not tf32): scores decide a ranking.
        DOT_PRECISION="ieee" if upcast or queries.dtype == torch.float32 else "tf32",
        EVEN_K=n_keys % block_k == 0,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def window_scores_reference(queries, query_rows, k_buffers, key_slots, sm_scale) -> torch.Tensor:
    """Float64 torch version of :func:`window_scores`, for tests."""
    q = queries[query_rows.long()].double()  # [B, L, NQ, HQ, D]
    k = torch.stack([kb[key_slots.long()] for kb in k_buffers], dim=1).double()  # [B, L, NK, HKV, D]
    group = q.shape[3] // k.shape[3]
    k = k.repeat_interleave(group, dim=3)
    s = torch.einsum("blqhd,blkhd->blhqk", q, k) * sm_scale
    return s.softmax(dim=-1).sum(dim=(1, 2, 3))
