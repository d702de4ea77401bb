"""LongFlow: decode attention of the current query, the per-token importance and the eviction.

Two launches (see "Why two launches" below):

1. :func:`longflow_decode`: for every request ``b``, voting layer ``l`` and query head ``h``,
   the decode attention of the request's current query over its whole KV (prompt included),
   read in place by slot from SGLang's per-layer K/V buffers through ``req_to_token`` (as
   SGLang's own decode kernel reads them), and from the same softmax the importance of the
   decode tokens ``[start_b, start_b + n_scores)``::

       p[l, h, j]  = softmax_j( q[b, l, h] . K_l[slot(b, j), h // G] * sm_scale )   (over all j < kv_len)
       out[b, l, h] = sum_j p[l, h, j] * V_l[slot(b, j), h // G]
       importance[b, j - start_b] = sum over l, h of p[l, h, j] * |V_l[slot(b, j), h // G]|_1

   ``p * |v|_1`` is the L1 norm of token ``j``'s contribution vector ``p_j v_j``: the term the
   attention adds to its output for that token, LongFlow's importance (an intermediate of the
   attention computation, nothing stored between steps). Each program owns one (request,
   layer, head): pass 1 is an online softmax over every key (running max and sum, and the
   output accumulator when ``with_output``), pass 2 revisits only the scored tokens and adds
   ``p * |v|_1`` into ``importance`` (float32 atomics: the sum order over heads and layers may
   vary between runs, within float32 rounding).

2. :func:`evict_lowest`: per request, the ``n_evict`` lowest-importance tokens are evicted and
   the kept positions are written in ascending order, on the device (no host sync). A token's
   rank is the number of tokens with a lower importance, ties broken by position (older first):
   exactly a stable ascending sort, so every row evicts exactly ``n_evict`` tokens. One program
   per request compares every pair of scored tokens in blocks (quadratic in ``n_scores``; fine
   for decode budgets of a few thousand tokens, each eviction being amortised over many steps).

Why two launches: a token's importance is a sum over every query head and voting layer, which
run in different programs; it is complete only when all of them have finished, and a grid-wide
wait inside one launch needs a semaphore we cannot test on the CPU interpreter. (The authors'
public code likewise takes its argmin outside its attention kernel.)

Arithmetic: dot products and sums in float32 (operands upcast after the load, no ``tl.dot``,
whose bf16 form Triton 3.6's CPU interpreter gets wrong), exponentials in base 2 with the scale
folded in. The attention output is float32.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from kara_kernels._buffers import buffer_offsets
# tl.sum / tl.max of float32, through tl.reduce: one NumPy call under Triton's CPU interpreter
# (where tl.sum / tl.max are device functions, each call re-patching triton.language).
from triton.language.standard import _elementwise_max as _max_combine
from triton.language.standard import _sum_combine

LOG2E = 1.4426950408889634


@triton.jit
def _longflow_decode_kernel(
    Q, stride_qr, stride_ql, stride_qh, Q_ROWS,
    K_BASE, K_OFFSETS, V_BASE, V_OFFSETS, stride_ks, stride_kh, stride_vs, stride_vh,
    REQ_TO_TOKEN, stride_rt, POOL_ROWS, KV_LENS, SCORE_START,
    OUT, stride_ob, stride_ol, stride_oh,
    IMP, stride_ib,
    n_scores, num_q_heads, qk_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, WITH_OUTPUT: tl.constexpr,
):
    pid_b = tl.program_id(0)
    pid_lh = tl.program_id(1)
    layer = pid_lh // num_q_heads
    head = pid_lh % num_q_heads
    kv_head = head // GROUP

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_row = tl.load(Q_ROWS + pid_b).to(tl.int64)
    q = tl.load(Q + q_row * stride_qr + layer * stride_ql + head * stride_qh + offs_d,
                mask=d_ok, other=0.0).to(tl.float32)
    k_layer = K_BASE + tl.load(K_OFFSETS + layer) + kv_head * stride_kh
    v_layer = V_BASE + tl.load(V_OFFSETS + layer) + kv_head * stride_vh
    slot_row = REQ_TO_TOKEN + tl.load(POOL_ROWS + pid_b).to(tl.int64) * stride_rt
    kv_len = tl.load(KV_LENS + pid_b)
    # Rows are loaded inline (no helper): each device-function call costs milliseconds under
    # the CPU interpreter.

    # Pass 1: online softmax over every key of the request (log2 domain).
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, kv_len, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        valid = offs_n < kv_len
        slots = tl.load(slot_row + offs_n, mask=valid, other=0).to(tl.int64)
        k = tl.load(k_layer + slots[:, None] * stride_ks + offs_d[None, :],
                    mask=valid[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        s = tl.where(valid, tl.reduce(q[None, :] * k, 1, _sum_combine) * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 0, _max_combine))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new)
        l_i = l_i * alpha + tl.reduce(p, 0, _sum_combine)
        if WITH_OUTPUT:
            v = tl.load(v_layer + slots[:, None] * stride_vs + offs_d[None, :],
                        mask=valid[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            acc = acc * alpha + tl.reduce(p[:, None] * v, 0, _sum_combine)
        m_i = m_new
    if WITH_OUTPUT:
        out = OUT + pid_b.to(tl.int64) * stride_ob + layer * stride_ol + head * stride_oh
        tl.store(out + offs_d, acc / l_i, mask=d_ok)

    # Pass 2: the scored tokens' probabilities (final max and sum), times |v|_1.
    score_start = tl.load(SCORE_START + pid_b)
    imp_row = IMP + pid_b.to(tl.int64) * stride_ib
    inv_l = 1.0 / l_i
    for start in range(0, n_scores, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        pos = score_start + offs_n
        valid = (offs_n < n_scores) & (pos < kv_len)
        slots = tl.load(slot_row + pos, mask=valid, other=0).to(tl.int64)
        k = tl.load(k_layer + slots[:, None] * stride_ks + offs_d[None, :],
                    mask=valid[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        v = tl.load(v_layer + slots[:, None] * stride_vs + offs_d[None, :],
                    mask=valid[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        s = tl.reduce(q[None, :] * k, 1, _sum_combine) * qk_scale_log2
        p = tl.math.exp2(s - m_i) * inv_l
        tl.atomic_add(imp_row + offs_n, p * tl.reduce(tl.abs(v), 1, _sum_combine), mask=valid)


def longflow_decode(
    queries: torch.Tensor,
    query_rows: torch.Tensor,
    k_buffers: Sequence[torch.Tensor],
    v_buffers: Sequence[torch.Tensor],
    req_to_token: torch.Tensor,
    pool_rows: torch.Tensor,
    kv_lens: torch.Tensor,
    sm_scale: float,
    score_start: Optional[torch.Tensor] = None,
    n_scores: int = 0,
    with_output: bool = True,
    block_n: int = 64,
    num_warps: int = 4,
) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """Decode attention of each request's current query, and its tokens' importance.

    Args:
        queries: ``[rows, n_vote, q_heads, head_dim]`` the current query of each voting layer
            (after RoPE, as SGLang's attention receives it); ``head_dim`` contiguous.
        query_rows: ``[B]`` int row of each request in ``queries``.
        k_buffers, v_buffers: the ``n_vote`` layers' K and V buffers, each
            ``[num_slots, kv_heads, head_dim]``, in the order of ``queries``' layer axis.
        req_to_token: ``[pool_rows, max_context]`` int slot of each request's i-th KV entry.
        pool_rows: ``[B]`` int row of each request in ``req_to_token``.
        kv_lens: ``[B]`` int KV entries of each request (at least 1); attention runs over all.
        sm_scale: softmax scale.
        score_start: ``[B]`` int first KV index scored (default 0); ``n_scores`` tokens from
            there get an importance (they must lie below ``kv_lens``).
        with_output: compute the attention output too (off: pass 1 reads only K).

    Returns:
        ``(out, importance)``: ``out`` ``[B, n_vote, q_heads, head_dim]`` float32 (``None``
        without output) and ``importance`` ``[B, n_scores]`` float32.
    """
    n_rows, n_vote, q_heads, head_dim = queries.shape
    if len(k_buffers) != n_vote or len(v_buffers) != n_vote:
        raise ValueError(f"{len(k_buffers)} K / {len(v_buffers)} V buffers for {n_vote} voting layers")
    kv_heads = k_buffers[0].shape[1]
    if q_heads % kv_heads:
        raise ValueError(f"{q_heads} query heads do not group over {kv_heads} KV heads")
    if queries.stride(-1) != 1 or any(b.stride(-1) != 1 for b in list(k_buffers) + list(v_buffers)):
        raise ValueError("head_dim must be the innermost, contiguous axis")
    for bufs in (k_buffers, v_buffers):
        if any(b.stride()[:2] != bufs[0].stride()[:2] for b in bufs):
            raise ValueError("all K (and all V) buffers must share one layout")
    n = pool_rows.shape[0]
    device = req_to_token.device
    if score_start is None:
        score_start = torch.zeros(n, dtype=torch.int64, device=device)
    # The kernel indexes these by request id: a strided view (a column of a 2-D index
    # tensor) would be read as if packed.
    query_rows, pool_rows, kv_lens, score_start = (
        t.contiguous() for t in (query_rows, pool_rows, kv_lens, score_start))
    importance = torch.zeros(n, n_scores, dtype=torch.float32, device=device)
    out = (torch.empty(n, n_vote, q_heads, head_dim, dtype=torch.float32, device=device)
           if with_output else None)
    if n == 0:
        return out, importance
    k_base, k_offsets = buffer_offsets(k_buffers)
    v_base, v_offsets = buffer_offsets(v_buffers)
    out_arg = out if out is not None else importance  # never written without output
    out_strides = out.stride()[:3] if out is not None else (0, 0, 0)
    _longflow_decode_kernel[(n, n_vote * q_heads)](
        queries, *queries.stride()[:3], query_rows,
        k_base, k_offsets, v_base, v_offsets,
        k_buffers[0].stride(0), k_buffers[0].stride(1), v_buffers[0].stride(0), v_buffers[0].stride(1),
        req_to_token, req_to_token.stride(0), pool_rows, kv_lens, score_start,
        out_arg, *out_strides,
        importance, importance.stride(0),
        n_scores, q_heads, sm_scale * LOG2E,
        GROUP=q_heads // kv_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_N=block_n, WITH_OUTPUT=with_output, num_warps=num_warps,
    )
    return out, importance


@triton.jit
def _evict_lowest_kernel(IMP, stride_ib, KEEP, stride_kb, n, n_evict, BLOCK: tl.constexpr):
    pid_b = tl.program_id(0)
    imp_row = IMP + pid_b.to(tl.int64) * stride_ib
    keep_row = KEEP + pid_b.to(tl.int64) * stride_kb
    kept = 0
    for j_start in range(0, n, BLOCK):
        j = j_start + tl.arange(0, BLOCK)
        j_ok = j < n
        s_j = tl.load(imp_row + j, mask=j_ok, other=0.0)
        # rank[j] = tokens before j in a stable ascending sort (lower score, or equal and older).
        rank = tl.zeros([BLOCK], dtype=tl.int32)
        for i_start in range(0, n, BLOCK):
            i = i_start + tl.arange(0, BLOCK)
            i_ok = i < n
            s_i = tl.load(imp_row + i, mask=i_ok, other=0.0)
            before = (s_i[None, :] < s_j[:, None]) | ((s_i[None, :] == s_j[:, None]) & (i[None, :] < j[:, None]))
            rank += tl.sum((before & i_ok[None, :]).to(tl.int32), axis=1)
        keep = j_ok & (rank >= n_evict)
        dest = kept + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(keep_row + dest, j.to(tl.int64), mask=keep)
        kept += tl.sum(keep.to(tl.int32), axis=0)


def evict_lowest(importance: torch.Tensor, n_evict: int, block: int = 128) -> torch.Tensor:
    """Kept positions ``[B, n - n_evict]`` (int64, ascending) after evicting, per row, the
    ``n_evict`` lowest-importance tokens (ties: the older token goes first)."""
    n_rows, n = importance.shape
    if not 0 <= n_evict <= n:
        raise ValueError(f"cannot evict {n_evict} of {n} tokens")
    importance = importance.float().contiguous()
    keep = torch.empty(n_rows, n - n_evict, dtype=torch.int64, device=importance.device)
    if n_rows == 0 or keep.shape[1] == 0:
        return keep
    block = min(block, triton.next_power_of_2(n))
    _evict_lowest_kernel[(n_rows,)](importance, importance.stride(0), keep, keep.stride(0), n, n_evict,
                                    BLOCK=block, num_warps=4)
    return keep


def longflow_decode_reference(queries, query_rows, k_buffers, v_buffers, req_to_token, pool_rows, kv_lens,
                              sm_scale, score_start=None, n_scores=0):
    """Float64 torch version of :func:`longflow_decode`, for tests."""
    n = pool_rows.shape[0]
    q_heads = queries.shape[2]
    outs, imps = [], []
    for b in range(n):
        length = int(kv_lens[b])
        slots = req_to_token[int(pool_rows[b]), :length].long()
        q = queries[int(query_rows[b])].double()  # [L, H, D]
        k = torch.stack([kb[slots] for kb in k_buffers]).double()  # [L, N, HKV, D]
        v = torch.stack([vb[slots] for vb in v_buffers]).double()
        group = q_heads // k.shape[2]
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        p = (torch.einsum("lhd,lnhd->lhn", q, k) * sm_scale).softmax(dim=-1)  # [L, H, N]
        outs.append(torch.einsum("lhn,lnhd->lhd", p, v))
        start = 0 if score_start is None else int(score_start[b])
        contribution = (p * v.abs().sum(-1).permute(0, 2, 1)).sum(dim=(0, 1))  # [N]
        imps.append(contribution[start: start + n_scores])
    return torch.stack(outs), torch.stack(imps) if imps else torch.zeros(0, n_scores, dtype=torch.float64)


def evict_lowest_reference(importance: torch.Tensor, n_evict: int) -> torch.Tensor:
    """Torch version of :func:`evict_lowest`: a stable ascending sort evicts the first ``n_evict``."""
    order = importance.argsort(dim=1, stable=True)
    return order[:, n_evict:].sort(dim=1).values
