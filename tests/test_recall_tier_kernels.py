"""Recall tier kernels (kernels/recall_tier.py) against loops, on fresh random inputs each run
(the seed is in every failure message): packing and quantisation exactly as documented, the
ranking's values, the decode's softmax, and the tier giving what kernels/recall.py's emulation
of it gives on the same slots."""

import random

import pytest
import torch

from kara_kernels.recall import rank_evicted, recall_decode
from kara_kernels.recall_tier import (QUANT_GROUP, fill_recall_buffer, quantize_to_tier, rank_tier, recall_decode_tier,
                                      tier_bytes_per_token)


def _gen():
    seed = random.randrange(2 ** 31)
    return seed, torch.Generator().manual_seed(seed)


def _tier(layers, slots, heads, dim, v_dim, bits, gen):
    """A tier ``[L, T, ...]`` filled with random bytes (so untouched slots are recognisable)."""
    def codes(d):
        return torch.randint(0, 256, (layers, slots, heads, d * bits // 8), generator=gen, dtype=torch.uint8)

    def scales(d):
        return (torch.rand(layers, slots, heads, d // QUANT_GROUP, generator=gen) * 0.3 + 0.01).half()

    def los(d):
        return (-torch.rand(layers, slots, heads, d // QUANT_GROUP, generator=gen) * 2).half()

    return [codes(dim), los(dim), scales(dim), codes(v_dim), los(v_dim), scales(v_dim)]


def _unpack(packed, bits):
    """Codes from packed bytes as documented: channel d is bits (d % (8 // bits)) * bits of byte d // (8 // bits)."""
    per = 8 // bits
    d = torch.arange(packed.shape[-1] * per)
    return (packed.long()[..., d // per] >> ((d % per) * bits)) & (2 ** bits - 1)


def _pack(codes, bits):
    """The documented packing, bytewise: byte i = sum_j code[i * per + j] << (j * bits)."""
    per = 8 // bits
    c = codes.long().reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    return sum(c[..., j] << (j * bits) for j in range(per)).to(torch.uint8)


def _quantise(x, bits):
    """The documented quantisation of ``x`` [..., D] per group of 32 channels, op by op in the
    kernel's float32 (each op correctly rounded, as the kernel's): (codes, lo, step), lo and
    step in float32 (the tier stores them rounded to float16)."""
    g = x.float().reshape(*x.shape[:-1], x.shape[-1] // QUANT_GROUP, QUANT_GROUP)
    lo = g.amin(-1)
    step = torch.clamp(g.amax(-1) - lo, min=1e-8) / (2 ** bits - 1)
    codes = torch.floor((g - lo[..., None]) / step[..., None] + 0.5).clamp(0, 2 ** bits - 1)
    return codes.reshape(x.shape).long(), lo, step


def _dequant64(codes, lo16, step16):
    """float64 dequantisation: code * step + lo, lo and step per group of 32 channels."""
    rep = lambda t: t.double().repeat_interleave(QUANT_GROUP, dim=-1)  # noqa: E731
    return codes.double() * rep(step16) + rep(lo16)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype, D, Dv, Hkv", [(torch.bfloat16, 64, 64, 1), (torch.float32, 128, 96, 2),
                                               (torch.bfloat16, 128, 128, 3), (torch.float32, 64, 128, 1)])
def test_quantize_writes_documented_codes_and_scales_and_nothing_else(bits, dtype, D, Dv, Hkv):
    seed, gen = _gen()
    pool, T, n = 60, 40, 23
    k = (torch.randn(pool, Hkv, D, generator=gen) * (torch.rand(pool, Hkv, 1, generator=gen) + 0.05) * 4).to(dtype)
    # V a strided view (heads further apart than Dv), as a pool with fused or padded heads.
    v = torch.randn(pool, Hkv, Dv + 32, generator=gen).to(dtype)[:, :, 16:16 + Dv]
    src = torch.randperm(pool, generator=gen)[:n]
    dst = torch.randperm(T, generator=gen)[:n]
    tier = _tier(2, T, Hkv, D, Dv, bits, gen)
    before = [t.clone() for t in tier]
    quantize_to_tier(k, v, src, dst, *(t[1] for t in tier), bits)  # layer 1's views: strided, offset
    untouched = torch.ones(T, dtype=torch.bool)
    untouched[dst] = False
    for name, (codes, lo, step), (c0, lo0, st0), x in (
            ("K", tier[:3], before[:3], k), ("V", tier[3:], before[3:], v)):
        want_codes, want_lo, want_step = _quantise(x[src], bits)
        want_lo, want_step = want_lo.half(), want_step.half()
        msg = f"seed {seed}: {name}"
        assert torch.equal(codes[1, dst], _pack(want_codes, bits)), msg
        assert torch.equal(_unpack(codes[1, dst], bits), want_codes), msg
        assert torch.equal(lo[1, dst], want_lo) and torch.equal(step[1, dst], want_step), msg
        # Untouched: other tier slots of the layer, and every slot of the other layer.
        assert torch.equal(codes[1, untouched], c0[1, untouched]) and torch.equal(codes[0], c0[0]), msg
        assert torch.equal(lo[1, untouched], lo0[1, untouched]) and torch.equal(lo[0], lo0[0]), msg
        assert torch.equal(step[1, untouched], st0[1, untouched]) and torch.equal(step[0], st0[0]), msg
        # float64: the dequantised value is within half a step of the input, up to float16's
        # rounding of lo and step (2**-11 relative each; codes reach 2**bits - 1 steps up, so
        # about (|lo| + |hi - lo|) * 2**-11 in all; 1e-5 for a subnormal float16 step).
        x64 = x[src].double()
        got = _dequant64(_unpack(codes[1, dst], bits), lo[1, dst], step[1, dst])
        g = x64.reshape(n, Hkv, -1, QUANT_GROUP)
        spread = (g.amax(-1).abs() + g.amin(-1).abs()).repeat_interleave(QUANT_GROUP, -1)
        half = step[1, dst].double().repeat_interleave(QUANT_GROUP, -1) / 2
        assert ((got - x64).abs() <= half + spread * 2 ** -9 + 1e-5).all(), msg


def test_bad_bits_and_head_dims_are_refused():
    k = torch.randn(4, 1, 48)
    tier = _tier(1, 4, 1, 64, 64, 4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="divisible by 32"):
        quantize_to_tier(k, k, torch.tensor([0]), torch.tensor([0]), *(t[0] for t in tier), 4)
    with pytest.raises(ValueError, match="packs"):
        quantize_to_tier(k, k, torch.tensor([0]), torch.tensor([0]), *(t[0] for t in tier), 3)
    with pytest.raises(ValueError, match="divisible by 32"):
        tier_bytes_per_token(2, 2, 80, 64, 4)
    # codes D * bits / 8 plus float16 lo and step per 32 channels, K and V, every layer and head.
    assert tier_bytes_per_token(3, 2, 64, 128, 4) == 3 * 2 * ((32 + 2 * 2 * 2) + (64 + 2 * 2 * 4))
    assert tier_bytes_per_token(1, 1, 128, 128, 8) == 2 * (128 + 16)


def _check_rank(bits, D, Hq, Hkv, q_dtype, T, lens, n_cols, **blocking):
    """rank_tier against float64 dot products on a random tier; rows out of batch order and a
    table wider than any count."""
    seed, gen = _gen()
    B, G = len(lens), Hq // Hkv
    k_codes, k_lo, k_step = (t[1] for t in _tier(2, T, Hkv, D, D, bits, gen)[:3])
    q = torch.randn(B, Hq, D, generator=gen).to(q_dtype)
    width = max(lens) + 3
    table = torch.stack([torch.randperm(T, generator=gen)[:width] for _ in range(B + 2)])
    rows, lens = torch.randperm(B + 2, generator=gen)[:B], torch.tensor(lens)
    # NaN where nothing was written.
    got = rank_tier(q, k_codes, k_lo, k_step, table, rows, lens, n_cols, bits, 0.3, **blocking,
                    out=torch.full((B, Hkv, n_cols), float("nan")))
    keys = _dequant64(_unpack(k_codes, bits), k_lo, k_step)  # [T, Hkv, D] float64
    want = torch.full((B, Hkv, n_cols), float("-inf"), dtype=torch.float64)
    for b in range(B):
        n = int(lens[b])
        k_b = keys[table[rows[b], :n]]  # [n, Hkv, D]
        for h in range(Hkv):
            want[b, h, :n] = (k_b[:, h] @ q[b, h * G:(h + 1) * G].double().T).amax(-1) * 0.3
    bad = ~((got.double() - want).abs() <= 1e-4 + 1e-5 * want.abs()) & ~((got == float("-inf")) & (want == float("-inf")))
    assert not bad.any(), f"seed {seed}: {bad.nonzero()[:5].tolist()} of {blocking}"


@pytest.mark.parametrize("bits, D, Hq, Hkv, q_dtype", [(2, 64, 6, 2, torch.float32), (4, 128, 4, 1, torch.float32),
                                                      (8, 96, 2, 2, torch.float32), (4, 128, 32, 8, torch.bfloat16),
                                                      (2, 96, 3, 1, torch.bfloat16)])
@pytest.mark.parametrize("variant", [{}, {"head_major": True}, {"bias_codes": True}])
def test_rank_tier_scores_are_dequantised_dot_products_max_over_the_group(bits, D, Hq, Hkv, q_dtype, variant):
    # A request with none; -inf past each count up to n_cols.
    _check_rank(bits, D, Hq, Hkv, q_dtype, T=50, lens=[11, 0, 6], n_cols=13, **variant)


@pytest.mark.parametrize("block_e, split, variant", [(16, 3, {}), (32, 2, {}), (16, 20, {}),
                                                     (32, 2, {"head_major": True}), (16, 20, {"head_major": True}),
                                                     (16, 3, {"bias_codes": True, "head_major": True})])
def test_rank_tier_split_over_token_blocks_covers_every_column_once(block_e, split, variant):
    """The GPU's layout on the interpreter: each (request, KV head) split over programs looping
    over every split-th block up to the count, then -inf over their blocks up to n_cols (counts
    ending inside a block, on a block's end, and none; more programs than blocks)."""
    _check_rank(4, 64, 4, 2, torch.bfloat16, T=400, lens=[150, 0, 37, 64], n_cols=170, block_e=block_e,
                split=split, **variant)


def _reference_decode(q, k, v, resident, tier_rows, keys_t, vals_t, selected, scale):
    """float64 loops: per request and query head, softmax over the resident tokens (exact) and
    the selected tier tokens (dequantised); ``tier_rows[b]`` lists the request's tier slots."""
    B, Hq, _ = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, v.shape[2], dtype=torch.float64)
    for b in range(B):
        for head in range(Hq):
            h = head // G
            picks = [tier_rows[b][i] for i in selected[b, h].tolist() if i >= 0]
            ks = [k[s, h].double() for s in resident[b]] + [keys_t[t, h] for t in picks]
            vs = [v[s, h].double() for s in resident[b]] + [vals_t[t, h] for t in picks]
            w = (torch.stack(ks) @ q[b, head].double() * scale).softmax(0)
            out[b, head] = (w[:, None] * torch.stack(vs)).sum(0)
    return out


@pytest.mark.parametrize("R, bits", [(0, 4), (3, 4), (3, 2), ("all", 4), ("all", 8)])
def test_recall_decode_tier_matches_a_float64_loop(R, bits):
    seed, gen = _gen()
    B, Hq, Hkv, D, Dv, pool, T = 3, 4, 2, 64, 96, 200, 60
    k = torch.randn(pool, Hkv, D, generator=gen).bfloat16()
    v = torch.randn(pool, Hkv, Dv, generator=gen).bfloat16()
    q = torch.randn(B, Hq, D, generator=gen)
    tier = [t[1] for t in _tier(2, T, Hkv, D, Dv, bits, gen)]
    keys_t = _dequant64(_unpack(tier[0], bits), tier[1], tier[2])
    vals_t = _dequant64(_unpack(tier[3], bits), tier[4], tier[5])
    # Resident counts per row, one above the interpreter's 128-token block, one row with none
    # (R > 0 only: attention over nothing is undefined); tier counts per row.
    res_lens = [5, 140, 0 if R else 2]
    tier_lens = [9, 0, 14]
    perm = torch.randperm(pool, generator=gen).tolist()
    resident = [perm[sum(res_lens[:i]):sum(res_lens[:i + 1])] for i in range(B)]
    tier_perm = torch.randperm(T, generator=gen).tolist()
    tier_rows = [tier_perm[sum(tier_lens[:i]):sum(tier_lens[:i + 1])] for i in range(B)]
    rows = torch.tensor([2, 0, 3])
    res_table = torch.zeros(4, 150, dtype=torch.int64)
    tier_table = torch.zeros(4, 20, dtype=torch.int64)
    for b in range(B):
        res_table[rows[b], :res_lens[b]] = torch.tensor(resident[b], dtype=torch.int64)
        tier_table[rows[b], :tier_lens[b]] = torch.tensor(tier_rows[b], dtype=torch.int64)
    width = max(tier_lens) if R == "all" else R
    selected = torch.full((B, Hkv, width), -1, dtype=torch.int64)
    for b in range(B):
        for h in range(Hkv):
            if R == "all":
                selected[b, h, :tier_lens[b]] = torch.randperm(tier_lens[b], generator=gen)
            elif tier_lens[b]:
                pick = torch.randperm(tier_lens[b], generator=gen)[:R]
                selected[b, h, :len(pick)] = pick
    if R == 3:
        selected[0, 1, 0] = -1  # a none before a token
        selected[2, 0, 2] = -1
    got = recall_decode_tier(q, k, v, res_table, torch.tensor(res_lens), *tier, tier_table, rows, selected,
                             bits, 0.125)
    want = _reference_decode(q, k, v, resident, tier_rows, keys_t, vals_t, selected, 0.125)
    assert torch.allclose(got.double(), want, atol=1e-4), f"seed {seed}: {(got.double() - want).abs().max()}"


@pytest.mark.parametrize("R", [3, "all"])
def test_tier_gives_what_the_emulation_gives_on_the_same_slots(R):
    """4 bits: quantising the evicted slots into the tier, then rank_tier + top-R +
    recall_decode_tier, matches rank_evicted(bits=4) + recall_decode(kv_bits=4) on the same
    bf16 slots, up to the float16 rounding of lo and step (the codes are the emulation's)."""
    seed, gen = _gen()
    bits, B, Hq, Hkv, D, pool, T = 4, 3, 4, 2, 64, 160, 80
    G = Hq // Hkv
    scale = D ** -0.5
    k = torch.randn(pool, Hkv, D, generator=gen)
    v = torch.randn(pool, Hkv, D, generator=gen).bfloat16()
    q = torch.randn(B, Hq, D, generator=gen)
    select_q = torch.randn(B, Hq, D, generator=gen)
    res_lens, ev_lens = [3, 6, 2], [12, 0, 20]
    perm = torch.randperm(pool, generator=gen).tolist()
    at, resident, evicted = 0, [], []
    for n_res, n_ev in zip(res_lens, ev_lens):
        resident.append(perm[at:at + n_res]); at += n_res
        evicted.append(perm[at:at + n_ev]); at += n_ev
    if R != "all":  # well-separated top R per request and KV head: both pick the same tokens
        for b in range(B):
            for h in range(Hkv):
                for j in torch.randperm(ev_lens[b], generator=gen)[:R].tolist():
                    k[evicted[b][j], h] = 0.3 * k[evicted[b][j], h] + select_q[b, h * G]
    k = k.bfloat16()
    rows = torch.tensor([1, 3, 0])
    res_table = torch.zeros(4, 8, dtype=torch.int64)
    ev_table = torch.zeros(4, 24, dtype=torch.int64)
    tier_table = torch.zeros(4, 24, dtype=torch.int64)
    src = torch.tensor(sum(evicted, []), dtype=torch.int64)
    dst = torch.randperm(T, generator=gen)[:len(src)]  # tier slots in no particular order
    tier = [torch.zeros_like(t) for t in _tier(3, T, Hkv, D, D, bits, gen)]
    layer = [t[2] for t in tier]
    quantize_to_tier(k, v, src, dst, *layer, bits)
    at = 0
    for b in range(B):
        res_table[rows[b], :res_lens[b]] = torch.tensor(resident[b], dtype=torch.int64)
        ev_table[rows[b], :ev_lens[b]] = torch.tensor(evicted[b], dtype=torch.int64)
        tier_table[rows[b], :ev_lens[b]] = dst[at:at + ev_lens[b]]; at += ev_lens[b]
    n_cols, lens = 22, torch.tensor(ev_lens)

    rank_e = rank_evicted(select_q, k, ev_table, rows, lens, n_cols, bits, scale)
    rank_t = rank_tier(select_q, *layer[:3], tier_table, rows, lens, n_cols, bits, scale)
    assert torch.equal(rank_e == float("-inf"), rank_t == float("-inf")), f"seed {seed}"
    # The bound float16's rounding of lo and step allows: per channel, |lo16 - lo| + code * |step16 - step|.
    codes_k, lo_k, step_k = _quantise(k, bits)  # the whole pool, [pool, Hkv, ...]
    dev = _dequant64(codes_k, lo_k.half(), step_k.half()) - _dequant64(codes_k, lo_k, step_k)
    dev = dev.abs()
    for b in range(B):
        for h in range(Hkv):
            for e in range(ev_lens[b]):
                bound = max(float(select_q[b, h * G + i].abs().double() @ dev[evicted[b][e], h]) for i in range(G))
                diff = abs(float(rank_t[b, h, e]) - float(rank_e[b, h, e]))
                assert diff <= bound * scale + 1e-4, f"seed {seed}: b={b} h={h} e={e}: {diff} > {bound * scale}"

    def top(rank, width):
        t = rank.topk(width, dim=-1)
        return t.indices.masked_fill(t.values == float("-inf"), -1).sort(-1).values

    width = n_cols if R == "all" else R
    sel_e, sel_t = top(rank_e, width), top(rank_t, width)
    assert torch.equal(sel_e, sel_t), f"seed {seed}"
    out_e = recall_decode(q, k, v, res_table, torch.tensor(res_lens), ev_table, rows, sel_e, scale, kv_bits=bits)
    out_t = recall_decode_tier(q, k, v, res_table, torch.tensor(res_lens), *layer, tier_table, rows, sel_t,
                               bits, scale)
    # The outputs differ by what float16 lo and step change, no more: the same float64 loop over
    # the same codes with float32 and with float16 lo/step gives that change (about 1e-3 here;
    # one code one step off is ~0.3 in a value, a misplaced code more).
    codes_v, lo_v, step_v = _quantise(v, bits)
    ref = {}
    for name, half in (("emulation", False), ("tier", True)):
        rounded = (lambda t: t.half()) if half else (lambda t: t)  # noqa: E731
        keys = _dequant64(codes_k, rounded(lo_k), rounded(step_k))
        vals = _dequant64(codes_v, rounded(lo_v), rounded(step_v))
        ref[name] = _reference_decode(q, k, v, resident, evicted, keys, vals, sel_t, scale)
    fp16_effect = ref["tier"] - ref["emulation"]
    assert torch.allclose(out_e.double(), ref["emulation"], atol=1e-4), f"seed {seed}"
    assert fp16_effect.abs().max() < 1e-2, f"seed {seed}"
    err = ((out_t.double() - out_e.double()) - fp16_effect).abs().max().item()
    assert err < 1e-4, f"seed {seed}: the tier's output is {err} off the emulation's plus float16's rounding"


def _buffer_case(gen, bits, dtype, B=3, Hq=4, Hkv=2, D=64, Dv=96, pool=120, T=50, R=4):
    """Requests with tier rows and recall buffers: rows, tier table and counts, buffer slots
    (disjoint from the resident slots), a pool and a tier of random values."""
    k = torch.randn(pool, Hkv, D, generator=gen).to(dtype)
    v = torch.randn(pool, Hkv, Dv, generator=gen).to(dtype)
    tier = [t[1] for t in _tier(2, T, Hkv, D, Dv, bits, gen)]
    rows = torch.tensor([2, 0, 3])
    tier_lens = torch.tensor([9, 14, 6])
    tier_perm = torch.randperm(T, generator=gen)
    tier_table = torch.zeros(4, 16, dtype=torch.int64)
    at = 0
    for b in range(B):
        n = int(tier_lens[b])
        tier_table[rows[b], :n] = tier_perm[at:at + n]
        at += n
    slot_perm = torch.randperm(pool - 1, generator=gen) + 1
    buffer_slots = torch.zeros(4, R, dtype=torch.int64)
    buffer_slots[rows] = slot_perm[:B * R].reshape(B, R)
    resident = [slot_perm[B * R + 10 * b:B * R + 10 * b + 3 + 3 * b].tolist() for b in range(B)]
    q = torch.randn(B, Hq, D, generator=gen)
    return k, v, tier, rows, tier_table, tier_lens, buffer_slots, resident, q


@pytest.mark.parametrize("bits, dtype", [(4, torch.bfloat16), (2, torch.float32), (8, torch.float16)])
def test_fill_writes_each_heads_pick_dequantised_into_the_buffer_and_nothing_else(bits, dtype):
    seed, gen = _gen()
    k, v, tier, rows, tier_table, tier_lens, buffer_slots, _, _ = _buffer_case(gen, bits, dtype)
    B, Hkv, R = 3, 2, 4
    keys_t = _dequant64(_unpack(tier[0], bits), tier[1], tier[2])
    vals_t = _dequant64(_unpack(tier[3], bits), tier[4], tier[5])
    selected = torch.stack([torch.stack([torch.randperm(int(tier_lens[b]), generator=gen)[:R] for _ in range(Hkv)])
                            for b in range(B)])
    selected[0, 1, 2] = -1  # no token: that head of the slot keeps its value
    selected[2, 0, 3] = 6  # past the request's count (6): nothing written either
    live = torch.tensor([1, 0, 1], dtype=torch.int32)  # request 1: no buffer (or a padded entry)
    k0, v0 = k.clone(), v.clone()
    fill_recall_buffer(selected, tier_table, rows, tier_lens, live, buffer_slots, *tier, k, v, bits)
    want_k, want_v = k0.clone(), v0.clone()
    for b in range(B):
        for h in range(Hkv):
            for j in range(R):
                pick = int(selected[b, h, j])
                if not live[b] or pick < 0 or pick >= tier_lens[b]:
                    continue
                slot, t = int(buffer_slots[rows[b], j]), int(tier_table[rows[b], pick])
                want_k[slot, h], want_v[slot, h] = keys_t[t, h].to(dtype), vals_t[t, h].to(dtype)
    # The kernel rounds float32 code * step + lo to the pool's dtype; float64's may land one
    # unit in the last place away at a tie.
    for got, want in ((k, want_k), (v, want_v)):
        ulp = want.double().abs() * torch.finfo(dtype).eps + 1e-6
        assert bool(((got.double() - want.double()).abs() <= ulp).all()), f"seed {seed}"
        assert torch.equal(got != want, (got.double() - want.double()).abs() > 0), f"seed {seed}"
    changed = ((k != k0).flatten(1).any(1) | (v != v0).flatten(1).any(1)).nonzero().flatten().tolist()
    assert set(changed) <= set(buffer_slots[rows[[0, 2]]].flatten().tolist()), f"seed {seed}"


def test_attention_over_resident_and_filled_buffer_is_the_tier_decode():
    """What SGLang's attention computes over a row holding a filled buffer (plain softmax over
    the resident slots and the buffer's slots, each KV head reading its own head) equals
    recall_decode_tier's attention over resident + the selected tier tokens."""
    seed, gen = _gen()
    bits, B, Hq, Hkv, R = 4, 3, 4, 2, 4
    k, v, tier, rows, tier_table, tier_lens, buffer_slots, resident, q = _buffer_case(gen, bits, torch.float32)
    selected = torch.stack([torch.stack([torch.randperm(int(tier_lens[b]), generator=gen)[:R] for _ in range(Hkv)])
                            for b in range(B)])
    res_table = torch.zeros(4, 20, dtype=torch.int64)
    for b in range(B):
        res_table[rows[b], :len(resident[b])] = torch.tensor(resident[b])
    res_lens = torch.tensor([len(r) for r in resident])
    want = recall_decode_tier(q, k, v, res_table, res_lens, *tier, tier_table, rows, selected, bits, 0.125)
    fill_recall_buffer(selected, tier_table, rows, tier_lens, torch.ones(B, dtype=torch.int32), buffer_slots,
                       *tier, k, v, bits)
    G = Hq // Hkv
    for b in range(B):
        slots = resident[b] + buffer_slots[rows[b]].tolist()
        for head in range(Hq):
            h = head // G
            w = (k[slots, h].double() @ q[b, head].double() * 0.125).softmax(0)
            got = (w[:, None] * v[slots, h].double()).sum(0)
            assert torch.allclose(got, want[b, head].double(), atol=1e-4), f"seed {seed}: b={b} head={head}"


def test_fill_ranked_over_a_wider_row_writes_the_same():
    """recall_fill_tier spans the tier row's full width while a CUDA graph is captured and the
    longest row eagerly: the columns past each count rank -inf, so both write the same."""
    from kara_sglang.recall import recall_fill_tier

    seed, gen = _gen()
    bits = 4
    k, v, tier, rows, tier_table, tier_lens, buffer_slots, _, q = _buffer_case(gen, bits, torch.float32)
    live = torch.ones(3, dtype=torch.int32)
    results = []
    for n_cols in (int(tier_lens.max()), tier_table.shape[1]):
        kk, vv = k.clone(), v.clone()
        recall_fill_tier(q, tier, bits, tier_table, rows, tier_lens, live, buffer_slots, None, kk, vv, 0.125, n_cols)
        results.append((kk, vv))
    assert not torch.equal(results[0][0], k), f"seed {seed}: nothing written"
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1]), f"seed {seed}"



def test_fill_tuning_keeps_only_launches_that_agree_with_the_reference(monkeypatch):
    """kara_sglang/recall_tune.py at tiny shapes on the interpreter: every candidate is checked
    against the reference launch before it is timed; one made wrong (its scores scaled) and a
    selection made wrong (its picks shifted) are rejected, never chosen."""
    import kara_kernels.select_top as selection
    import kara_sglang.recall_tune as tune

    real_rank, real_select = tune.rank_tier, selection.select_top

    def rank_tier(*args, wrong=False, **kwargs):
        out = real_rank(*args, **kwargs)
        return out * 1.5 if wrong else out

    def select_top(rank, lens, tokens, n_cols):
        picks = real_select(rank, lens, tokens, n_cols)
        return torch.where(picks > 0, picks - 1, picks)  # the column before each pick

    monkeypatch.setattr(tune, "rank_tier", rank_tier)
    monkeypatch.setattr(selection, "select_top", select_top)
    launch, lines = tune.tune_fill(4, 2, 64, 4, batch=3, per_row=40, n_cols=70, tokens=8, dtype=torch.bfloat16,
                                   device=torch.device("cpu"), iters=1,
                                   rank_candidates=({}, {"head_major": True}, {"wrong": True}))
    assert len(lines) == 5, lines
    assert "rejected" in lines[2] and "rejected" in lines[4], lines
    assert "rejected" not in lines[0] + lines[1] + lines[3], lines
    assert launch.rank in ({}, {"head_major": True}) and launch.select == "torch"
    # Unpatched, both selections agree at these shapes (ties aside) and one is chosen.
    monkeypatch.setattr(selection, "select_top", real_select)
    launch, lines = tune.tune_fill(4, 2, 64, 4, batch=2, per_row=30, n_cols=40, tokens=8, dtype=torch.bfloat16,
                                   device=torch.device("cpu"), iters=1, rank_candidates=({},))
    assert not any("rejected" in line for line in lines), lines
    # The server's entry point times nothing on the CPU.
    assert tune.tune_fill_for_server(4, 2, 64, 4, 3, 100, 70, 8, torch.bfloat16, torch.device("cpu")) == tune.FillLaunch()


@pytest.mark.parametrize("rows, tier_tokens, n_cols, horizon, shape", [
    (257, 316_000, 17_504, 0, (257, 1229)),  # no horizon: every row shares the tier
    (257, 316_000, 4096, 4096, (77, 4096)),  # a horizon: a full tier's rows, each at the horizon
    (8, 316_000, 4096, 4096, (8, 4096)),  # never more rows than the server runs
    (257, 1000, 4096, 4096, (1, 1000)),  # a tier below one horizon: one row of what it holds
    (257, 4 << 20, 17_504, 0, (64, 16_320)),  # capped at MAX_SYNTHETIC_TOKENS by fewer rows
])
def test_the_fill_is_tuned_at_the_shape_the_server_runs(rows, tier_tokens, n_cols, horizon, shape):
    import kara_sglang.recall_tune as tune

    assert tune.tuning_shape(rows, tier_tokens, n_cols, horizon) == shape


def test_two_stage_tuning_keeps_only_selections_that_agree(monkeypatch):
    """With pages, the tuning also times the two-stage selections (in-kernel, radix, torch) on
    a synthetic tier with its page bounds; one made wrong (its picks shifted) is rejected."""
    import kara_sglang.recall_tune as tune

    real = tune.select_two_stage

    def select_two_stage(*args):
        picks = real(*args[:13], "radix" if args[13] == "wrong" else args[13], *args[14:])
        return torch.where(picks > 0, picks - 1, picks) if args[13] == "wrong" else picks

    monkeypatch.setattr(tune, "select_two_stage", select_two_stage)
    launch, lines = tune.tune_fill(4, 2, 64, 4, batch=3, per_row=60, n_cols=70, tokens=8, dtype=torch.bfloat16,
                                   device=torch.device("cpu"), iters=1, rank_candidates=({},),
                                   select_candidates=("torch",), pages_kept=2,
                                   two_stage_candidates=("fused", "wrong", "torch"),
                                   second_stage_candidates=(tune.SECOND_STAGE_LAUNCH,))  # timed in the next test
    two = [line for line in lines if line.startswith("two stages")]
    assert len(two) == 3 and "rejected" in two[1] and "rejected" not in two[0] + two[2], lines
    assert launch.two_stage_select in ("fused", "torch")
    assert tune.FillLaunch().two_stage_select == "fused"  # the CPU's (untimed) reference


def test_write_tuning_keeps_only_launches_whose_buffers_agree(monkeypatch):
    """The buffer writes' launch is timed on a synthetic tier; a launch made wrong (its K
    written off by one) is rejected, the others each time a call, and one of them is kept."""
    import kara_sglang.recall_tune as tune

    real = tune.refresh_recall_buffer

    calls = []

    def refresh(*args, block_w=None, write_warps=8):
        calls.append(int(args[0][0, 0, 0]))  # the selection's first pick
        real(*args, block_w=block_w, write_warps=write_warps)
        if block_w == 2:
            args[13].add_(1)  # k_buffer

    monkeypatch.setattr(tune, "refresh_recall_buffer", refresh)
    lines = []
    best = tune.tune_writes(2, 64, 4, batch=3, per_row=40, n_cols=70, tokens=8, dtype=torch.bfloat16,
                            device=torch.device("cpu"), iters=1, candidates=((16, 8), (2, 1), (4, 1)), lines=lines)
    assert len(lines) == 3 and "rejected" in lines[1] and "rejected" not in lines[0] + lines[2], lines
    assert best in ((16, 8), (4, 1))
    assert calls[-1] != calls[-2]  # the last launch's timed calls alternate: each writes half anew
    # Rows too short for half of a buffer anew: nothing timed, the first launch.
    assert tune.tune_writes(2, 64, 4, batch=3, per_row=10, n_cols=70, tokens=8, dtype=torch.bfloat16,
                            device=torch.device("cpu"), iters=1) == tune.WRITE_CANDIDATES[0]
    assert tune.FillLaunch().writes is None  # the CPU's (untimed) launch: the kernel's default


def test_second_stage_tuning_keeps_only_launches_that_agree(monkeypatch):
    """Under the chosen two-stage selection, the second stage's launches are timed too; one
    made wrong (its picks shifted) is rejected, and the launch kept is one that agrees."""
    import kara_sglang.recall_tune as tune

    real = tune.select_two_stage

    def select_two_stage(*args):
        launch = dict(args[14])
        wrong = launch.pop("wrong", False)
        picks = real(*args[:14], launch)
        return torch.where(picks > 0, picks - 1, picks) if wrong else picks

    monkeypatch.setattr(tune, "select_two_stage", select_two_stage)
    good = {**tune.SECOND_STAGE_LAUNCH, "block_e": 128}
    launch, lines = tune.tune_fill(4, 2, 64, 4, batch=3, per_row=60, n_cols=70, tokens=8, dtype=torch.bfloat16,
                                   device=torch.device("cpu"), iters=1, rank_candidates=({},),
                                   select_candidates=("torch",), pages_kept=2, two_stage_candidates=("fused",),
                                   second_stage_candidates=(tune.SECOND_STAGE_LAUNCH, {"wrong": True}, good))
    second = [line for line in lines if line.startswith("second stage under fused")]
    assert len(second) == 3 and "rejected" in second[1] and "rejected" not in second[0] + second[2], lines
    assert launch.second_stage in (tune.SECOND_STAGE_LAUNCH, good)
    # Kept pages whose tokens all fit the buffer: no second stage to tune.
    launch, lines = tune.tune_fill(4, 2, 64, 4, batch=3, per_row=60, n_cols=70, tokens=32, dtype=torch.bfloat16,
                                   device=torch.device("cpu"), iters=1, rank_candidates=({},),
                                   select_candidates=("torch",), pages_kept=2, two_stage_candidates=("fused",))
    assert launch.second_stage is None and not any(line.startswith("second stage") for line in lines), lines
