"""Recall tier kernels: evicted K and V held at low precision in a tier of their own.

kernels/recall.py emulates a low-precision tier by rounding evicted tokens' K and V in
registers while their bf16 slots stay allocated in SGLang's pool. Here the tier is real: a
compression quantises the evicted tokens' K and V into separate tensors (then the caller frees
the pool slots), and each decode step ranks and attends to them dequantised from there.

Tier layout, one layer (the caller allocates ``[L, T, ...]`` and passes layer views; the slot
and head strides are honoured, the last dimension must be contiguous):

- ``k_codes``: uint8 ``[T, Hkv, D * BITS // 8]``, codes packed low bits first: BITS = 8 one code
  a byte; BITS = 4 channel ``2i`` in the low nibble of byte ``i`` and ``2i + 1`` in the high one;
  BITS = 2 channel ``4i + j`` in bits ``2j .. 2j + 1`` of byte ``i``.
- ``k_lo``, ``k_step``: float16 ``[T, Hkv, D // 32]``, per token, head and group of 32 channels.
- ``v_codes``, ``v_lo``, ``v_step`` the same with ``Dv``.

Quantisation, per token, head and group of ``QUANT_GROUP`` channels, in float32 (IEEE divisions,
``tl.math.div_rn``, so GPU and CPU give the same codes)::

    lo   = min(x)                    hi = max(x)
    step = max(hi - lo, 1e-8) / (2**BITS - 1)
    code = clamp(floor((x - lo) / step + 0.5), 0, 2**BITS - 1)     # float32 lo and step
    stored: code, float16(lo), float16(step)

The codes come from the float32 ``lo`` and ``step``, the same arithmetic as
kernels/recall.py's emulation, so the tier's codes equal the emulation's; only ``lo`` and
``step`` are then rounded to float16 (round to nearest even). Dequantisation is
``code * float32(step16) + float32(lo16)`` in float32, so the tier differs from the emulation
by the float16 rounding of ``lo`` and ``step`` alone (about 2**-11 relative). K and V must lie
within float16's range (|x| < 65504); a group whose range is below float16's smallest step
dequantises to its ``lo``.

Device functions are avoided (each call costs milliseconds under Triton's CPU interpreter), so
the unpacking is written out in each kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from triton.language.standard import _elementwise_max as _max_combine
from triton.language.standard import _elementwise_min as _min_combine
from triton.language.standard import _sum_combine

from kara_kernels._buffers import interpreting
from kara_kernels.recall import LOG2E, QUANT_GROUP
from kara_kernels.select_top import SORTED_MAX_COLS, top_of_row, top_of_row_sorted

TIER_BITS = (2, 4, 8)

__all__ = ["QUANT_GROUP", "TIER_BITS", "fill_recall_buffer", "quantize_to_tier", "rank_tier",
           "recall_decode_tier", "tier_bytes_per_token"]


def tier_bytes_per_token(num_layers: int, kv_heads: int, head_dim: int, v_head_dim: int, bits: int) -> int:
    """Tier bytes one token takes over all layers: packed codes plus float16 lo and step, K and V."""
    _check_bits(bits)
    _check_dims(head_dim, v_head_dim)
    per_head = sum(dim * bits // 8 + 2 * 2 * (dim // QUANT_GROUP) for dim in (head_dim, v_head_dim))
    return num_layers * kv_heads * per_head


def _check_bits(bits: int) -> None:
    if bits not in TIER_BITS:
        raise ValueError(f"the recall tier packs {TIER_BITS} bits, got {bits}")


def _check_dims(head_dim: int, v_head_dim: int) -> None:
    if head_dim % QUANT_GROUP or v_head_dim % QUANT_GROUP or head_dim <= 0 or v_head_dim <= 0:
        raise ValueError(f"the recall tier needs head dims divisible by {QUANT_GROUP}, got {head_dim}/{v_head_dim}")


def _check_tier(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, dim: int, bits: int, name: str) -> None:
    if codes.dtype != torch.uint8 or lo.dtype != torch.float16 or step.dtype != torch.float16:
        raise ValueError(f"{name}: codes must be uint8 and lo/step float16")
    if codes.shape[-1] != dim * bits // 8 or lo.shape[-1] != dim // QUANT_GROUP or step.shape != lo.shape:
        raise ValueError(f"{name}: shapes {tuple(codes.shape)}/{tuple(lo.shape)}/{tuple(step.shape)} "
                         f"do not hold head dim {dim} at {bits} bits")
    if codes.shape[:2] != lo.shape[:2]:
        raise ValueError(f"{name}: codes and lo/step hold different slots or heads")
    for t in (codes, lo, step):
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: the last dimension must be contiguous")
    if lo.stride() != step.stride():
        raise ValueError(f"{name}: lo and step must share one layout (the kernels take one set of strides)")


def _check_pool(k_buffer: torch.Tensor, v_buffer: torch.Tensor) -> None:
    if k_buffer.stride(-1) != 1 or v_buffer.stride(-1) != 1:
        raise ValueError("the K and V buffers' last dimension must be contiguous")


@triton.jit
def _quantize_kernel(
    XB, stride_xbs, stride_xbh,
    SRC, DST, n_tokens,
    XC, stride_xcs, stride_xch, XLO, XST, stride_xss, stride_xsh,
    DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, BITS: tl.constexpr, QGROUP: tl.constexpr,
):
    """One of K or V (launched once for each): blocks of tokens x one KV head."""
    head = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < n_tokens
    src = tl.load(SRC + offs_t, mask=t_ok, other=0).to(tl.int64)
    dst = tl.load(DST + offs_t, mask=t_ok, other=0).to(tl.int64)
    LEVELS: tl.constexpr = 2 ** BITS - 1
    PER_BYTE: tl.constexpr = 8 // BITS

    # Padding channels (BLOCK_D > DIM) form whole groups of their own, not stored.
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < DIM
    x = tl.load(XB + src[:, None] * stride_xbs + head * stride_xbh + offs_d[None, :],
                mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    g = tl.reshape(x, (BLOCK_T, BLOCK_D // QGROUP, QGROUP))
    lo = tl.reduce(g, 2, _min_combine)
    step = tl.math.div_rn(tl.maximum(tl.reduce(g, 2, _max_combine) - lo, 1e-8), tl.full(lo.shape, LEVELS, tl.float32))
    code = tl.floor(tl.math.div_rn(g - lo[:, :, None], tl.broadcast_to(step[:, :, None], g.shape)) + 0.5)
    code = tl.minimum(tl.maximum(code, 0.0), LEVELS).to(tl.int32)
    offs_g = tl.arange(0, BLOCK_D // QGROUP)
    g_mask = t_ok[:, None] & (offs_g < DIM // QGROUP)[None, :]
    s_off = dst[:, None] * stride_xss + head * stride_xsh + offs_g[None, :]
    tl.store(XLO + s_off, lo.to(tl.float16), mask=g_mask)
    tl.store(XST + s_off, step.to(tl.float16), mask=g_mask)
    if BITS == 8:
        packed = tl.reshape(code, (BLOCK_T, BLOCK_D))
        offs_b = offs_d
    else:
        c = tl.reshape(code, (BLOCK_T, BLOCK_D // PER_BYTE, PER_BYTE))
        shift = tl.arange(0, PER_BYTE) * BITS
        packed = tl.reduce(c << shift[None, None, :], 2, _sum_combine)  # disjoint bits: sum == or
        offs_b = tl.arange(0, BLOCK_D // PER_BYTE)
    tl.store(XC + dst[:, None] * stride_xcs + head * stride_xch + offs_b[None, :], packed.to(tl.uint8),
             mask=t_ok[:, None] & (offs_b < DIM * BITS // 8)[None, :])


@triton.jit
def _minus_inf_past_count(out, n_tier, n_cols, pid_s, BLOCK_E: tl.constexpr, SPLIT: tl.constexpr):
    """Program ``pid_s``'s token blocks past the count, up to ``n_cols``: -inf (the first is the
    first block k >= the count's block with k % SPLIT == pid_s)."""
    first = tl.cdiv(n_tier, BLOCK_E)
    first = first + (pid_s - first % SPLIT + SPLIT) % SPLIT
    for start in range(first * BLOCK_E, n_cols, SPLIT * BLOCK_E):
        offs_e = start + tl.arange(0, BLOCK_E)
        tl.store(out + offs_e, tl.full((BLOCK_E,), float("-inf"), tl.float32), mask=offs_e < n_cols)


@triton.jit
def _rank_tier_kernel(
    Q, stride_qb, stride_qh,
    KC, stride_kcs, stride_kch, KLO, KST, stride_kss, stride_ksh,
    TT, stride_tt, ROWS, T_LENS,
    OUT, stride_ob, stride_oh,
    PAGES, stride_pb, stride_ph,
    SEL, stride_sb, stride_sh, n_top,
    n_cols, scale,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_BYTES: tl.constexpr,
    BLOCK_E: tl.constexpr, SPLIT: tl.constexpr, STAGES: tl.constexpr, BITS: tl.constexpr,
    QGROUP: tl.constexpr, IEEE: tl.constexpr, LOW_DOT: tl.constexpr, HEAD_MAJOR: tl.constexpr,
    BIAS_CODES: tl.constexpr, PAGE: tl.constexpr, TOP: tl.constexpr, BLOCK_SEL: tl.constexpr,
    SORTED_TOP: tl.constexpr, K_TOP: tl.constexpr,
):
    """Scores of one request's tier tokens for one KV head, on the tensor cores.

    With ``code`` the unpacked codes and ``g`` a group of 32 channels,
    ``q . dequant(k) = sum_g step_g * (q_g . code_g) + lo_g * sum(q_g)``: one matrix product
    of the codes ``[BLOCK_E, channels]`` with a block-diagonal query matrix ``[channels,
    groups x heads]`` (head h's channels of group g in column g * G_PAD + h) gives every
    ``q_g . code_g``; lo and step are read once per group, the packed bytes once each.

    Program ``s`` of ``SPLIT`` takes the row's token blocks ``s, s + SPLIT, ...`` up to the
    request's count, read on the device (a CUDA graph captured at the row's full width does no
    work past the count), and writes -inf over its blocks from there to ``n_cols``. The query
    matrix is built once per program, and the loop's loads are pipelined ``STAGES`` deep.
    ``HEAD_MAJOR`` orders the programs KV head first, so a request's heads run side by side
    and read each token's bytes (heads adjacent in the tier) at about the same time.

    ``PAGE`` > 0 (the second stage of a two-stage ranking): output column ``c`` scores the
    row's column ``PAGES[b, h, c // PAGE] * PAGE + c % PAGE`` (-inf for a page of -1 or a
    column past the count). The chosen pages come first (as both selections write them), so
    only the first ``ceil(count / PAGE)`` pages are read: a row holding few tier tokens costs
    little, as in the one-stage ranking.

    ``TOP`` (``SPLIT`` 1): the scores are scratch, written up to the count only; then the same
    program writes the ``n_top`` best to ``SEL`` as row columns (select_top's semantics; with
    ``PAGE``, mapped through the pages, a pick of no token -1), so the selection costs no
    launch and no pass over memory of its own.
    """
    pid_b = tl.program_id(1 if HEAD_MAJOR else 0)
    kv_head = tl.program_id(0 if HEAD_MAJOR else 1)
    pid_s = tl.program_id(2)
    PER_BYTE: tl.constexpr = 8 // BITS
    BLOCK_D: tl.constexpr = BLOCK_BYTES * PER_BYTE
    NG: tl.constexpr = BLOCK_D // QGROUP
    n_tier = tl.load(T_LENS + pid_b)
    row = tl.load(ROWS + pid_b).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_h = tl.arange(0, G_PAD)
    # Queries [BLOCK_D, G_PAD] (padding heads and channels 0), then block-diagonal by group.
    q = tl.load(Q + pid_b.to(tl.int64) * stride_qb + (kv_head * GROUP + offs_h)[None, :] * stride_qh
                + offs_d[:, None], mask=(offs_d < HEAD_DIM)[:, None] & (offs_h < GROUP)[None, :], other=0.0)
    offs_g = tl.arange(0, NG)
    in_group = (offs_d // QGROUP)[:, None] == offs_g[None, :]  # [BLOCK_D, NG]
    q_blocks_own = tl.reshape(tl.where(in_group[:, :, None], q[:, None, :], 0.0), (BLOCK_D, NG * G_PAD))
    q_blocks = q_blocks_own.to(tl.float32)
    q_sum = tl.reshape(tl.sum(q_blocks, axis=0), (NG, G_PAD))
    g_ok = offs_g < HEAD_DIM // QGROUP
    offs_byte = tl.arange(0, BLOCK_BYTES)
    byte_ok = offs_byte < HEAD_DIM * BITS // 8
    out = OUT + pid_b.to(tl.int64) * stride_ob + kv_head * stride_oh
    if PAGE:
        end = tl.minimum(n_cols, tl.cdiv(n_tier, PAGE) * PAGE)
    else:
        end = n_tier
    for start in tl.range(pid_s * BLOCK_E, end, SPLIT * BLOCK_E, num_stages=STAGES):
        offs_e = start + tl.arange(0, BLOCK_E)
        if PAGE:
            # One load per page, its PAGE columns built in registers: a page index loaded per
            # token (a gather of BLOCK_E int64) held 168-255 registers a thread at 4 warps, this
            # 96-128 (sm_90, benchmarks/kernel_resources.py): 4 programs an SM instead of 2-3.
            N_PG: tl.constexpr = BLOCK_E // PAGE
            offs_pg = start // PAGE + tl.arange(0, N_PG)
            page = tl.load(PAGES + pid_b.to(tl.int64) * stride_pb + kv_head * stride_ph + offs_pg,
                           mask=offs_pg * PAGE < end, other=-1).to(tl.int32)
            cols = tl.reshape(page[:, None] * PAGE + tl.arange(0, PAGE)[None, :], (BLOCK_E,))
            valid = (cols >= 0) & (cols < n_tier) & (offs_e < end)
        else:
            cols = offs_e
            valid = offs_e < n_tier
        slots = tl.load(TT + row * stride_tt + cols, mask=valid, other=0).to(tl.int64)
        byte = tl.load(KC + slots[:, None] * stride_kcs + kv_head * stride_kch + offs_byte[None, :],
                       mask=valid[:, None] & byte_ok[None, :], other=0).to(tl.int32)
        s_off = slots[:, None] * stride_kss + kv_head * stride_ksh + offs_g[None, :]
        lo = tl.load(KLO + s_off, mask=valid[:, None] & g_ok[None, :], other=0.0).to(tl.float32)
        step = tl.load(KST + s_off, mask=valid[:, None] & g_ok[None, :], other=0.0).to(tl.float32)
        # Channel PER_BYTE * i + j is bits j * BITS .. of byte i (padding bytes give code 0).
        if BITS == 8:
            code = byte
        else:
            shift = tl.arange(0, PER_BYTE) * BITS
            code = tl.reshape((byte[:, :, None] >> shift[None, None, :]) & (2 ** BITS - 1), (BLOCK_E, BLOCK_D))
        # Exact products, float32 sums: codes (<= 255) and bf16 / fp16 queries are exact in the
        # queries' own 16-bit type (LOW_DOT: half the operand bytes in shared memory) and in
        # TF32 (10 mantissa bits); float32 queries take IEEE float32.
        # BIAS_CODES (codes < 128): the product takes 128 + code, whose bf16 bits are
        # 0x4300 | code (an OR and a truncation, no int-to-float conversion, which bounds this
        # loop on a GPU: 2-bit codes, half the bytes, rank no faster); 128 * sum(q_g) is taken
        # off through lo below.
        if BIAS_CODES and LOW_DOT:
            operand = (code | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
        elif BIAS_CODES:
            operand = code.to(tl.float32) + 128.0
        elif LOW_DOT:
            operand = code.to(q_blocks_own.dtype)
        else:
            operand = code.to(tl.float32)
        if LOW_DOT:
            part = tl.dot(operand, q_blocks_own, out_dtype=tl.float32)
        elif IEEE:
            part = tl.dot(operand, q_blocks, input_precision="ieee")
        else:
            part = tl.dot(operand, q_blocks, input_precision="tf32")
        part = tl.reshape(part, (BLOCK_E, NG, G_PAD))
        if BIAS_CODES:
            lo = lo - 128.0 * step
        score = tl.sum(step[:, :, None] * part + lo[:, :, None] * q_sum[None, :, :], axis=1)  # [BLOCK_E, G_PAD]
        best = tl.max(tl.where((offs_h < GROUP)[None, :], score, float("-inf")), axis=1)
        tl.store(out + offs_e, tl.where(valid, best * scale, float("-inf")), mask=offs_e < n_cols)
    if TOP:
        tl.debug_barrier()  # the row's scores, written by all of this program's threads
        sel = SEL + pid_b.to(tl.int64) * stride_sb + kv_head * stride_sh
        sel_pages = PAGES + pid_b.to(tl.int64) * stride_pb + kv_head * stride_ph
        if SORTED_TOP:
            top_of_row_sorted(out, tl.minimum(end, n_cols), n_top, sel, sel_pages, PAGE, BLOCK_SEL, K_TOP)
        else:
            top_of_row(out, tl.minimum(end, n_cols), n_top, sel, sel_pages, PAGE, BLOCK_SEL, 16)
    else:
        _minus_inf_past_count(out, end, n_cols, pid_s, BLOCK_E, SPLIT)


@triton.jit
def dequant_tokens(XC, stride_xcs, stride_xch, XLO, XST, stride_xss, stride_xsh, slot, head, offs_d, mask,
                   BITS: tl.constexpr, QGROUP: tl.constexpr):
    """float32 ``[tokens, channels]``: the tier's codes of tier slots ``slot`` (one KV head),
    times each channel group's step plus its minimum; 0 where ``mask`` is false."""
    PER_BYTE: tl.constexpr = 8 // BITS
    byte = tl.load(XC + slot[:, None] * stride_xcs + head * stride_xch + (offs_d // PER_BYTE)[None, :],
                   mask=mask, other=0).to(tl.int32)
    code = (byte >> ((offs_d % PER_BYTE) * BITS)[None, :]) & (2 ** BITS - 1)
    s_off = slot[:, None] * stride_xss + head * stride_xsh + (offs_d // QGROUP)[None, :]
    return (code.to(tl.float32) * tl.load(XST + s_off, mask=mask, other=0.0).to(tl.float32)
            + tl.load(XLO + s_off, mask=mask, other=0.0).to(tl.float32))


@triton.jit
def _recall_decode_tier_kernel(
    Q, stride_qb, stride_qh,
    K, stride_ks, stride_kh, V, stride_vs, stride_vh,
    RES, stride_res, RES_LENS,
    KC, stride_kcs, stride_kch, KLO, KST, stride_kss, stride_ksh,
    VC, stride_vcs, stride_vch, VLO, VST, stride_vss, stride_vsh,
    TT, stride_tt, ROWS,
    SEL, stride_selb, stride_selh, n_sel,
    OUT, stride_ob, stride_oh,
    qk_scale_log2,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    BITS: tl.constexpr, QGROUP: tl.constexpr,
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
    n_res = tl.load(RES_LENS + pid_b)

    # One online softmax (log2 domain) over the resident tokens (exact, from the pool), then
    # over the selected tier tokens (dequantised).
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([BLOCK_DV], dtype=tl.float32)
    for start in range(0, n_res, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        valid = offs < n_res
        slots = tl.load(res_row + offs, mask=valid, other=0).to(tl.int64)
        k = tl.load(K + slots[:, None] * stride_ks + kv_head * stride_kh + offs_d[None, :],
                    mask=valid[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        v = tl.load(V + slots[:, None] * stride_vs + kv_head * stride_vh + offs_dv[None, :],
                    mask=valid[:, None] & dv_ok[None, :], other=0.0).to(tl.float32)
        s = tl.where(valid, tl.reduce(q[None, :] * k, 1, _sum_combine) * qk_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 0, _max_combine))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe)
        l_i = l_i * alpha + tl.reduce(p, 0, _sum_combine)
        acc = acc * alpha + tl.reduce(p[:, None] * v, 0, _sum_combine)
        m_i = m_new

    sel_row = SEL + pid_b.to(tl.int64) * stride_selb + kv_head * stride_selh
    tier_row = TT + row * stride_tt
    for start in range(0, n_sel, BLOCK_R):
        offs = start + tl.arange(0, BLOCK_R)
        pick = tl.load(sel_row + offs, mask=offs < n_sel, other=-1)
        valid = pick >= 0
        slots = tl.load(tier_row + pick, mask=valid, other=0).to(tl.int64)
        k = dequant_tokens(KC, stride_kcs, stride_kch, KLO, KST, stride_kss, stride_ksh, slots, kv_head, offs_d,
                           valid[:, None] & d_ok[None, :], BITS, QGROUP)
        v = dequant_tokens(VC, stride_vcs, stride_vch, VLO, VST, stride_vss, stride_vsh, slots, kv_head, offs_dv,
                           valid[:, None] & dv_ok[None, :], BITS, QGROUP)
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


@triton.jit
def _fill_buffer_kernel(
    SEL, stride_selb, stride_selh, n_sel,
    ROWS, T_LENS, LIVE, TT, stride_tt, BUF, stride_buf,
    XC, stride_xcs, stride_xch, XLO, XST, stride_xss, stride_xsh,
    OUT, stride_os, stride_oh,
    DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BITS: tl.constexpr, QGROUP: tl.constexpr,
):
    """One of K or V (launched once for each): a request's j-th pick of one KV head, dequantised
    into that head of the request's j-th buffer slot."""
    pid_b = tl.program_id(0)
    head = tl.program_id(1)
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < DIM
    row = tl.load(ROWS + pid_b).to(tl.int64)
    n_tier = tl.load(T_LENS + pid_b)
    live = tl.load(LIVE + pid_b) != 0
    r_ok = offs_r < n_sel
    pick = tl.load(SEL + pid_b.to(tl.int64) * stride_selb + head * stride_selh + offs_r, mask=r_ok, other=-1)
    valid = r_ok & (pick >= 0) & (pick < n_tier) & live
    slot = tl.load(TT + row * stride_tt + pick, mask=valid, other=0).to(tl.int64)
    dst = tl.load(BUF + row * stride_buf + offs_r, mask=valid, other=0).to(tl.int64)
    mask = valid[:, None] & d_ok[None, :]
    x = dequant_tokens(XC, stride_xcs, stride_xch, XLO, XST, stride_xss, stride_xsh, slot, head, offs_d, mask,
                       BITS, QGROUP)
    tl.store(OUT + dst[:, None] * stride_os + head * stride_oh + offs_d[None, :],
             x.to(OUT.dtype.element_ty), mask=mask)


def _block(dim: int) -> int:
    return max(QUANT_GROUP, triton.next_power_of_2(dim))


def quantize_to_tier(k_buffer: torch.Tensor, v_buffer: torch.Tensor, src_slots: torch.Tensor,
                     dst_slots: torch.Tensor, k_codes: torch.Tensor, k_lo: torch.Tensor, k_step: torch.Tensor,
                     v_codes: torch.Tensor, v_lo: torch.Tensor, v_step: torch.Tensor, bits: int,
                     block_t: int = 16) -> None:
    """Quantise pool slots ``src_slots[i]`` (every KV head, K and V) into tier slots ``dst_slots[i]``.

    Args:
        k_buffer, v_buffer: ``[slots, Hkv, D]`` / ``[slots, Hkv, Dv]`` one layer's pool
            (bf16, fp16 or fp32).
        src_slots, dst_slots: ``[n]`` integer pool slots and tier slots.
        k_codes, k_lo, k_step, v_codes, v_lo, v_step: one layer's tier (module docstring).
        bits: 2, 4 or 8.
    Two launches (K, then V), each a grid over blocks of tokens x KV heads; tier slots not
    named are untouched.
    """
    _check_bits(bits)
    Hkv, D, Dv = k_buffer.shape[1], k_buffer.shape[2], v_buffer.shape[2]
    _check_dims(D, Dv)
    _check_pool(k_buffer, v_buffer)
    _check_tier(k_codes, k_lo, k_step, D, bits, "K tier")
    _check_tier(v_codes, v_lo, v_step, Dv, bits, "V tier")
    if k_codes.shape[1] != Hkv or v_codes.shape[1] != v_buffer.shape[1]:
        raise ValueError("the tier and the pool hold different numbers of KV heads")
    n = src_slots.numel()
    if dst_slots.numel() != n:
        raise ValueError(f"{n} source slots but {dst_slots.numel()} tier slots")
    if n == 0:
        return
    if interpreting():  # the CPU interpreter pays per program: fewer, larger blocks
        block_t = max(block_t, min(256, triton.next_power_of_2(n)))
    src, dst = src_slots.contiguous(), dst_slots.contiguous()
    for buffer, codes, lo, step in ((k_buffer, k_codes, k_lo, k_step), (v_buffer, v_codes, v_lo, v_step)):
        dim = buffer.shape[2]
        _quantize_kernel[(triton.cdiv(n, block_t), Hkv)](
            buffer, buffer.stride(0), buffer.stride(1), src, dst, n,
            codes, codes.stride(0), codes.stride(1), lo, step, lo.stride(0), lo.stride(1),
            DIM=dim, BLOCK_D=_block(dim), BLOCK_T=block_t, BITS=bits, QGROUP=QUANT_GROUP,
        )


def _selection_blocks(n_cols: int, top: int, sorted_top: bool):
    """``(BLOCK_SEL, K_TOP)`` of a ranking that selects: the radix's block over the row, or the
    sorted selection's whole row and padded pick count (kernels/select_top.py)."""
    if not (sorted_top and top):
        return min(2048, triton.next_power_of_2(max(16, n_cols))), 16
    k_top = max(16, triton.next_power_of_2(top))
    block = max(16, k_top, triton.next_power_of_2(n_cols))
    if block > SORTED_MAX_COLS:
        raise ValueError(f"sorted_top reads a row of at most {SORTED_MAX_COLS} columns and picks, "
                         f"got {n_cols} columns and {top} picks")
    return block, k_top


def rank_tier(queries: torch.Tensor, k_codes: torch.Tensor, k_lo: torch.Tensor, k_step: torch.Tensor,
              tier_table: torch.Tensor, rows: torch.Tensor, tier_lens: torch.Tensor, n_cols: int, bits: int,
              sm_scale: float, block_e: Optional[int] = None, split: Optional[int] = None,
              stages: int = 1, num_warps: int = 4, low_dot: bool = False, head_major: bool = False,
              bias_codes: bool = False, out: Optional[torch.Tensor] = None,
              pages: Optional[torch.Tensor] = None, page: int = 0, top: int = 0,
              sorted_top: bool = False) -> torch.Tensor:
    """Score of each request's tier tokens per KV head by their dequantised keys, ``-inf`` past its count.

    ``rank[b, h, e] = max_g q[b, h * G + g] . dequant(K_tier[tier_table[rows[b], e], h]) * sm_scale``.

    Args:
        queries: ``[B, Hq, D]``.
        k_codes, k_lo, k_step: one layer's K tier.
        tier_table: ``[rows, capacity]`` int64 tier slots per ``req_to_token`` row.
        rows, tier_lens: ``[B]`` each request's row and tier-token count.
        n_cols: columns of the result (at least the longest count).
        block_e, split, stages, num_warps: tokens per block (default 64; under the CPU
            interpreter, which pays per program and per loop step, up to 1024); programs per
            request and KV head (default: one per block, the launch measured on an H200; fewer
            make each program loop over several blocks, a setting
            benchmarks/reasoning/rank_select_bench.py times; under the interpreter 1); the
            loop's pipeline depth (default 1: no pipelining, as measured); warps per program.
        low_dot: bf16 / fp16 queries: the codes x queries product in the queries' own type
            (exact as TF32 is; default off, as measured; on a GPU only).
        head_major: programs ordered KV head first (a request's heads side by side).
        bias_codes: 2- and 4-bit codes enter the product as 128 + code (with ``low_dot`` and
            bf16 queries, built from the code's bits without an int-to-float conversion), the
            bias taken off after it (float32 scores, within summation order of the others).
        out: where to write the result (every element is written), else a new tensor.
        pages, page: rank only the chosen pages of each row: ``pages`` ``[B, Hkv, P]`` page
            indices of ``page`` columns each, the chosen ones first, then -1; output column
            ``c`` of head ``h`` scores column ``pages[b, h, c // page] * page + c % page``
            (``n_cols`` = P * page); past ``ceil(tier_lens[b] / page)`` pages, -inf.
        top: > 0: return instead ``[B, Hkv, min(top, n_cols)]`` int64, the row columns of the
            ``top`` best scores of each row, picked as ``select_top`` picks them (column order
            of the output columns, then -1; with ``pages``, a pick of no token is -1), in the
            kernel that scores them: one program per request and KV head (``split`` ignored),
            ``out`` the scores' scratch, valid up to each row's count only.
        sorted_top: with ``top``, select by ``top_of_row_sorted`` (the row in registers, the
            same picks; ``n_cols`` at most ``SORTED_MAX_COLS``) instead of the radix passes.
    Returns:
        ``[B, Hkv, n_cols]`` float32 (``top``: the picks).
    """
    _check_bits(bits)
    B, Hq, D = queries.shape
    Hkv = k_codes.shape[1]
    _check_dims(D, D)
    _check_tier(k_codes, k_lo, k_step, D, bits, "K tier")
    if out is None:
        out = torch.empty(B, Hkv, n_cols, dtype=torch.float32, device=queries.device)
    elif out.shape != (B, Hkv, n_cols) or out.dtype != torch.float32 or out.stride(2) != 1:
        raise ValueError(f"out must be float32 {(B, Hkv, n_cols)} with unit last stride")
    if pages is not None:
        if page <= 0 or pages.shape[:2] != (B, Hkv) or pages.shape[2] * page != n_cols or pages.stride(2) != 1:
            raise ValueError(f"pages must be [B, Hkv, P] with unit last stride and n_cols = P * page, "
                             f"got {tuple(pages.shape)}, page {page}, n_cols {n_cols}")
    else:
        pages, page = tier_lens, 0  # unused by the kernel
    top = min(top, n_cols)
    sel = torch.empty(B, Hkv, top, dtype=torch.int64, device=queries.device) if top else out
    if B == 0 or n_cols == 0:
        return sel
    if block_e is None:
        block_e = max(64, min(1024, triton.next_power_of_2(n_cols))) if interpreting() else 64
    if page and (block_e % page or page & (page - 1)):
        raise ValueError(f"a token block ({block_e}) must hold whole pages of a power-of-two size, got page {page}")
    n_blocks = triton.cdiv(n_cols, block_e)
    if split is None:
        split = 1 if interpreting() else n_blocks
    split = 1 if top else max(1, min(split, n_blocks))
    if queries.stride(2) != 1:
        queries = queries.contiguous()
    group = Hq // Hkv
    n_groups = _block(D) // QUANT_GROUP
    # The matrix product needs at least 16 columns (groups x padded heads).
    g_pad = max(triton.next_power_of_2(group), 16 // n_groups)
    # Triton's CPU interpreter gets 16-bit matrix products wrong (and int -> bf16 casts): there
    # the product is always float32, so low_dot is tested only on a GPU.
    dot16 = queries.dtype in (torch.bfloat16, torch.float16) and not interpreting()
    ieee = queries.dtype == torch.float32
    low = low_dot and dot16
    bias = bias_codes and bits <= 4 and (not low or queries.dtype == torch.bfloat16)
    grid = (Hkv, B, split) if head_major else (B, Hkv, split)
    block_sel, k_top = _selection_blocks(n_cols, top, sorted_top)
    _rank_tier_kernel[grid](
        queries, queries.stride(0), queries.stride(1),
        k_codes, k_codes.stride(0), k_codes.stride(1), k_lo, k_step, k_lo.stride(0), k_lo.stride(1),
        tier_table, tier_table.stride(0), rows, tier_lens,
        out, out.stride(0), out.stride(1),
        pages, pages.stride(0) if page else 0, pages.stride(1) if page else 0,
        sel, sel.stride(0), sel.stride(1), top,
        n_cols, sm_scale,
        GROUP=group, G_PAD=g_pad, HEAD_DIM=D, BLOCK_BYTES=_block(D) * bits // 8, BLOCK_E=block_e, SPLIT=split,
        STAGES=stages, BITS=bits, QGROUP=QUANT_GROUP, IEEE=ieee, LOW_DOT=low, HEAD_MAJOR=head_major,
        BIAS_CODES=bias, PAGE=page, TOP=bool(top), BLOCK_SEL=block_sel, SORTED_TOP=sorted_top and bool(top),
        K_TOP=k_top, num_warps=num_warps,
    )
    return sel


def recall_decode_tier(queries: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor,
                       resident_table: torch.Tensor, resident_lens: torch.Tensor,
                       k_codes: torch.Tensor, k_lo: torch.Tensor, k_step: torch.Tensor,
                       v_codes: torch.Tensor, v_lo: torch.Tensor, v_step: torch.Tensor,
                       tier_table: torch.Tensor, rows: torch.Tensor, selected: torch.Tensor, bits: int,
                       sm_scale: float, block_n: int = 32, block_r: int = 16) -> torch.Tensor:
    """Attention of each request's query heads over its resident tokens and selected tier tokens.

    Args:
        queries: ``[B, Hq, D]``.
        k_buffer, v_buffer: ``[slots, Hkv, D]`` / ``[slots, Hkv, Dv]`` one layer's pool.
        resident_table: ``[rows, columns]`` resident slots per row (``req_to_token``), valid
            below ``resident_lens`` (``[B]``); read exact.
        k_codes .. v_step: one layer's tier; tier_table, rows: as for :func:`rank_tier`.
        selected: ``[B, Hkv, R]`` indices into the request's tier row, ``-1`` for none; their K
            and V are dequantised from the tier.
    Returns:
        ``[B, Hq, Dv]`` float32 (a request and head with no resident or selected token gives NaN).
    """
    _check_bits(bits)
    B, Hq, D = queries.shape
    Hkv, Dv = k_buffer.shape[1], v_buffer.shape[2]
    _check_dims(D, Dv)
    _check_pool(k_buffer, v_buffer)
    _check_tier(k_codes, k_lo, k_step, D, bits, "K tier")
    _check_tier(v_codes, v_lo, v_step, Dv, bits, "V tier")
    out = torch.empty(B, Hq, Dv, dtype=torch.float32, device=queries.device)
    if B == 0:
        return out
    if selected.shape[2] and selected.stride(2) != 1:
        selected = selected.contiguous()
    if interpreting():
        block_n = max(block_n, 128)
        block_r = max(block_r, min(128, triton.next_power_of_2(max(1, selected.shape[2]))))
    _recall_decode_tier_kernel[(B, Hq)](
        queries, queries.stride(0), queries.stride(1),
        k_buffer, k_buffer.stride(0), k_buffer.stride(1), v_buffer, v_buffer.stride(0), v_buffer.stride(1),
        resident_table, resident_table.stride(0), resident_lens,
        k_codes, k_codes.stride(0), k_codes.stride(1), k_lo, k_step, k_lo.stride(0), k_lo.stride(1),
        v_codes, v_codes.stride(0), v_codes.stride(1), v_lo, v_step, v_lo.stride(0), v_lo.stride(1),
        tier_table, tier_table.stride(0), rows,
        selected, selected.stride(0), selected.stride(1), selected.shape[2],
        out, out.stride(0), out.stride(1),
        sm_scale * LOG2E,
        GROUP=Hq // Hkv, HEAD_DIM=D, BLOCK_D=_block(D), V_DIM=Dv, BLOCK_DV=_block(Dv),
        BLOCK_N=block_n, BLOCK_R=block_r, BITS=bits, QGROUP=QUANT_GROUP,
    )
    return out


def fill_recall_buffer(selected: torch.Tensor, tier_table: torch.Tensor, rows: torch.Tensor, tier_lens: torch.Tensor,
                       live: torch.Tensor, buffer_slots: torch.Tensor,
                       k_codes: torch.Tensor, k_lo: torch.Tensor, k_step: torch.Tensor,
                       v_codes: torch.Tensor, v_lo: torch.Tensor, v_step: torch.Tensor,
                       k_buffer: torch.Tensor, v_buffer: torch.Tensor, bits: int, block_r: int = 16) -> None:
    """Write each request's selected tier tokens, dequantised, into its recall buffer's pool slots.

    For request ``b`` with ``live[b]``, KV head ``h`` and pick ``j``: the K and V of tier slot
    ``tier_table[rows[b], selected[b, h, j]]`` (head ``h``) go to head ``h`` of pool slot
    ``buffer_slots[rows[b], j]``, in the pool's dtype. A buffer slot thus holds a different
    token per KV head, which is what a per-head selection attended by SGLang's own attention
    needs (a decode query of KV head ``h`` reads only head ``h``).

    Args:
        selected: ``[B, Hkv, R]`` indices into the request's tier row; ``-1`` or past
            ``tier_lens[b]`` writes nothing.
        tier_table, rows, tier_lens: as for :func:`rank_tier`.
        live: ``[B]`` nonzero where the request's buffer is written (padding and requests
            without a buffer: 0).
        buffer_slots: ``[rows, R]`` int64 pool slots of each row's buffer.
        k_codes .. v_step: one layer's tier; k_buffer, v_buffer: that layer's pool.
    Device-side only (no host read), so a captured CUDA graph replays it.
    """
    _check_bits(bits)
    B, Hkv, R = selected.shape
    D, Dv = k_buffer.shape[2], v_buffer.shape[2]
    _check_dims(D, Dv)
    _check_pool(k_buffer, v_buffer)
    _check_tier(k_codes, k_lo, k_step, D, bits, "K tier")
    _check_tier(v_codes, v_lo, v_step, Dv, bits, "V tier")
    if buffer_slots.shape[1] < R:
        raise ValueError(f"{R} picks per head for a buffer of {buffer_slots.shape[1]} slots")
    if B == 0 or R == 0:
        return
    if selected.stride(2) != 1:
        selected = selected.contiguous()
    if interpreting():
        block_r = max(block_r, min(256, triton.next_power_of_2(R)))
    for buffer, codes, lo, step in ((k_buffer, k_codes, k_lo, k_step), (v_buffer, v_codes, v_lo, v_step)):
        dim = buffer.shape[2]
        _fill_buffer_kernel[(B, Hkv, triton.cdiv(R, block_r))](
            selected, selected.stride(0), selected.stride(1), R,
            rows, tier_lens, live, tier_table, tier_table.stride(0), buffer_slots, buffer_slots.stride(0),
            codes, codes.stride(0), codes.stride(1), lo, step, lo.stride(0), lo.stride(1),
            buffer, buffer.stride(0), buffer.stride(1),
            DIM=dim, BLOCK_D=_block(dim), BLOCK_R=block_r, BITS=bits, QGROUP=QUANT_GROUP,
        )
