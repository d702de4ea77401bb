"""Two-stage ranking of the recall tier (kernels/recall_pages.py) against float64 references,
on fresh random tiers each run (the seed is in every failure message): page bounds, the pages'
Quest bound, ranking only chosen pages' tokens, and the two stages' selection."""

import random

import pytest
import torch

from kara_kernels.recall_pages import PAGE, page_bounds, rank_pages, select_two_stage
from kara_kernels.recall_tier import rank_tier
from kara_kernels.select_top import select_top
from test_recall_tier_kernels import _dequant64, _tier, _unpack


def _case(bits=4, D=64, Hq=4, Hkv=2, T=300, lens=(70, 0, 16, 33), q_dtype=torch.float32):
    seed = random.randrange(2 ** 31)
    gen = torch.Generator().manual_seed(seed)
    B = len(lens)
    k_codes, k_lo, k_step = (t[0] for t in _tier(1, T, Hkv, D, D, bits, gen)[:3])
    width = max(lens) + 2 * PAGE
    table = torch.stack([torch.randperm(T, generator=gen)[:width] for _ in range(B + 2)])
    rows, lens = torch.randperm(B + 2, generator=gen)[:B], torch.tensor(lens)
    q = torch.randn(B, Hq, D, generator=gen).to(q_dtype)
    keys = _dequant64(_unpack(k_codes, bits), k_lo, k_step)  # [T, Hkv, D]
    n_pages = -(-width // PAGE)
    # Each row's pages name bound pages in a shuffled order (the tier allocates them as rows grow).
    page_table = torch.randperm((B + 2) * n_pages + 5, generator=gen)[:(B + 2) * n_pages].view(B + 2, n_pages)
    hi = torch.full(((B + 2) * n_pages + 5, Hkv, D), float("nan"), dtype=torch.float16)
    lo = hi.clone()
    return seed, dict(q=q, tier=(k_codes, k_lo, k_step), table=table, rows=rows, lens=lens, keys=keys,
                      pt=page_table, hi=hi, lo=lo, n_pages=n_pages, bits=bits, G=Hq // Hkv)


def _all_bounds(c):
    pages = (c["lens"] + PAGE - 1) // PAGE
    page_bounds(*c["tier"], c["table"], c["rows"], c["lens"], torch.zeros_like(pages), pages, c["bits"],
                c["pt"], c["hi"], c["lo"])


def test_page_bounds_are_each_pages_key_max_and_min_and_touch_nothing_else():
    seed, c = _case(lens=(70, 0, 16, 33))
    first = torch.tensor([1, 0, 0, 0])  # row 0: pages 1..4 only (page 0 stays NaN)
    end = (c["lens"] + PAGE - 1) // PAGE
    page_bounds(*c["tier"], c["table"], c["rows"], c["lens"], first, end, c["bits"], c["pt"], c["hi"], c["lo"])
    written = torch.zeros(c["hi"].shape[0], dtype=torch.bool)
    for b, row in enumerate(c["rows"].tolist()):
        n = int(c["lens"][b])
        for p in range(int(first[b]), int(end[b])):
            k = c["keys"][c["table"][row, p * PAGE:min(n, (p + 1) * PAGE)]]  # [tokens, Hkv, D]
            bound = int(c["pt"][row, p])
            for got, want in ((c["hi"][bound], k.amax(0)), (c["lo"][bound], k.amin(0))):
                assert torch.allclose(got.double(), want, rtol=2 ** -10, atol=1e-6), f"seed {seed}: row {row} page {p}"
            written[bound] = True
    assert c["hi"][~written].isnan().all() and c["lo"][~written].isnan().all(), f"seed {seed}: wrote past its pages"


@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_page_scores_are_quest_bounds_max_over_the_group_and_bound_every_token(q_dtype):
    seed, c = _case(Hq=6, Hkv=2, lens=(70, 0, 16, 33), q_dtype=q_dtype)
    _all_bounds(c)
    n_pages = c["n_pages"]
    got = rank_pages(c["q"], c["pt"], c["hi"], c["lo"], c["rows"], c["lens"], n_pages, 0.3)
    tokens = rank_tier(c["q"], *c["tier"], c["table"], c["rows"], c["lens"], n_pages * PAGE, c["bits"], 0.3)
    G = c["G"]
    for b, row in enumerate(c["rows"].tolist()):
        n_valid = -(-int(c["lens"][b]) // PAGE)
        assert (got[b, :, n_valid:] == float("-inf")).all(), f"seed {seed}"
        for h in range(got.shape[1]):
            q = c["q"][b, h * G:(h + 1) * G].double()  # [G, D]
            bounds = c["pt"][row, :n_valid]
            hi, lo = c["hi"][bounds, h].double(), c["lo"][bounds, h].double()
            want = torch.maximum(q[:, None] * hi[None], q[:, None] * lo[None]).sum(-1).amax(0) * 0.3
            assert torch.allclose(got[b, h, :n_valid].double(), want, rtol=1e-4, atol=1e-4), f"seed {seed}"
            # A bound: no token of a page scores above it (up to the bounds' float16 rounding).
            per_page = tokens[b, h, :n_valid * PAGE].view(n_valid, PAGE).amax(-1)
            assert (per_page <= got[b, h, :n_valid] + 1e-2 * (1 + want.abs())).all(), f"seed {seed}"


def test_ranking_chosen_pages_scores_their_columns_and_nothing_else():
    seed, c = _case(lens=(70, 0, 16, 33))
    gen = torch.Generator().manual_seed(seed)
    B, Hkv = len(c["lens"]), c["tier"][0].shape[1]
    # The chosen pages first, then -1 (as the selections write them); some past the count.
    pages = torch.randint(0, 6, (B, Hkv, 3), generator=gen)
    pages[torch.rand(B, Hkv, 3, generator=gen).cumsum(-1) > 1.5] = -1
    n_cand = 3 * PAGE
    full = rank_tier(c["q"], *c["tier"], c["table"], c["rows"], c["lens"], 6 * PAGE, c["bits"], 0.3)
    got = rank_tier(c["q"], *c["tier"], c["table"], c["rows"], c["lens"], n_cand, c["bits"], 0.3, pages=pages,
                    page=PAGE, out=torch.full((B, Hkv, n_cand), float("nan")))
    for b in range(B):
        for h in range(Hkv):
            for j in range(n_cand):
                p = int(pages[b, h, j // PAGE])
                col = p * PAGE + j % PAGE
                n = int(c["lens"][b])  # only the first ceil(n / PAGE) chosen pages are ranked
                ranked = p >= 0 and col < n and j // PAGE < -(-n // PAGE)
                want = full[b, h, col] if ranked else float("-inf")
                assert got[b, h, j] == want or abs(float(got[b, h, j] - want)) < 1e-5, f"seed {seed}: {(b, h, j)}"
    with pytest.raises(ValueError):
        rank_tier(c["q"], *c["tier"], c["table"], c["rows"], c["lens"], n_cand + 1, c["bits"], 0.3, pages=pages,
                  page=PAGE)


@pytest.mark.parametrize("select", ["torch", "radix", "fused", "sorted"])
def test_two_stages_pick_the_best_tokens_of_the_best_pages(select):
    seed, c = _case(lens=(70, 0, 16, 33, 100))
    _all_bounds(c)
    n_pages, R = c["n_pages"], 8
    args = (c["q"], c["tier"], c["table"], c["rows"], c["lens"], c["pt"], c["hi"], c["lo"], n_pages)
    full = rank_tier(c["q"], *c["tier"], c["table"], c["rows"], c["lens"], n_pages * PAGE, c["bits"], 0.3)
    page_rank = rank_pages(c["q"], c["pt"], c["hi"], c["lo"], c["rows"], c["lens"], n_pages, 0.3)

    def picked(cols):  # the multiset of picked scores, -inf for no pick
        return full.gather(-1, cols.clamp(min=0)).masked_fill(cols < 0, float("-inf")).sort(-1).values

    # Every page kept: the one-stage selection.
    every = select_two_stage(*args, n_pages, R, c["bits"], 0.3, select)
    one = full.topk(R, -1)
    assert torch.equal(picked(every), one.values.sort(-1).values), f"seed {seed}"
    # Every page kept with room for all their tokens: each row's columns, no more.
    room = select_two_stage(*args, n_pages, n_pages * PAGE, c["bits"], 0.3, select)
    for b, n in enumerate(c["lens"].tolist()):
        for h in range(full.shape[1]):
            assert sorted(room[b, h][room[b, h] >= 0].tolist()) == list(range(n)), f"seed {seed}: {(b, h)}"
    # Two pages kept: the best R tokens among the two best pages' tokens, nothing else.
    two = select_two_stage(*args, 2, R, c["bits"], 0.3, select)
    whole = select_two_stage(*args, 2, 2 * PAGE, c["bits"], 0.3, select)
    for b in range(len(c["lens"])):
        for h in range(full.shape[1]):
            n_valid = -(-int(c["lens"][b]) // PAGE)
            best_pages = page_rank[b, h, :n_valid].topk(min(2, n_valid)).indices
            cand = torch.cat([torch.arange(p * PAGE, min((p + 1) * PAGE, int(c["lens"][b]))) for p in best_pages.tolist()]
                             + [torch.zeros(0, dtype=torch.long)])
            want = full[b, h, cand].topk(min(R, cand.numel())).values if cand.numel() else torch.zeros(0)
            cols = two[b, h][two[b, h] >= 0]
            assert cols.numel() == want.numel(), f"seed {seed}: {(b, h)}"
            assert torch.equal(full[b, h, cols].sort().values, want.sort().values), f"seed {seed}: {(b, h)}"
            assert all(c_ in cand.tolist() for c_ in cols.tolist()), f"seed {seed}: a column outside the best pages"
            # Room for every token of the two pages: exactly those, without a second ranking.
            cols = whole[b, h][whole[b, h] >= 0]
            assert sorted(cols.tolist()) == sorted(cand.tolist()), f"seed {seed}: {(b, h)}"


@pytest.mark.parametrize("sorted_top", [False, True])
def test_rankings_that_select_in_the_kernel_pick_what_the_radix_selection_of_their_scores_picks(sorted_top):
    """``top``: the selection inside the ranking kernel (one program per row and KV head, the
    scores as scratch; radix passes or, ``sorted_top``, the row sorted in registers) against the
    separate radix kernel over the same scores, exactly: same columns, same order, -1 in the
    same places. Rows of 0, fewer than R and many tokens; R and the pages kept both below and
    above what rows hold."""
    seed, c = _case(lens=(70, 0, 16, 33, 100, 5))
    _all_bounds(c)
    n_pages = c["n_pages"]
    pages = (c["lens"] + PAGE - 1) // PAGE
    scores = rank_pages(c["q"], c["pt"], c["hi"], c["lo"], c["rows"], c["lens"], n_pages, 0.3)
    for kept in (1, 3, n_pages):
        got = rank_pages(c["q"], c["pt"], c["hi"], c["lo"], c["rows"], c["lens"], n_pages, 0.3, top=kept,
                         sorted_top=sorted_top)
        assert torch.equal(got, select_top(scores, pages, kept)), f"seed {seed}: {kept} pages"
        n_cand = kept * PAGE
        cand = rank_tier(c["q"], *c["tier"], c["table"], c["rows"], c["lens"], n_cand, c["bits"], 0.3, pages=got,
                         page=PAGE)
        for R in (1, 8, 40):
            picks = select_top(cand, torch.full_like(c["lens"], n_cand), min(R, n_cand))
            safe = picks.clamp(min=0)
            page_of = got.gather(-1, safe // PAGE)
            dead = (picks < 0) | (page_of < 0) | (cand.gather(-1, safe) == float("-inf"))
            want = (page_of * PAGE + safe % PAGE).masked_fill(dead, -1)
            fused = rank_tier(c["q"], *c["tier"], c["table"], c["rows"], c["lens"], n_cand, c["bits"], 0.3,
                              pages=got, page=PAGE, top=R, sorted_top=sorted_top)
            assert fused.shape == want.shape, f"seed {seed}"
            # Where a row has at least R tokens in its pages the two agree entry by entry; where
            # fewer, the radix kernel also picks -inf columns past the row's pages, both as -1.
            full_rows = (want >= 0).sum(-1) == min(R, n_cand)
            assert torch.equal(fused[full_rows], want[full_rows]), f"seed {seed}: {kept} pages, R {R}"
            for b, h in (~full_rows).nonzero().tolist():
                assert torch.equal(fused[b, h][fused[b, h] >= 0], want[b, h][want[b, h] >= 0]), f"seed {seed}"
    # One stage, no pages: every column of the row ranked and selected in one kernel.
    width = int(c["lens"].max())
    one = rank_tier(c["q"], *c["tier"], c["table"], c["rows"], c["lens"], width, c["bits"], 0.3)
    for R in (1, 8, 40):
        got = rank_tier(c["q"], *c["tier"], c["table"], c["rows"], c["lens"], width, c["bits"], 0.3, top=R,
                        sorted_top=sorted_top)
        assert torch.equal(got, select_top(one, c["lens"], R, width)), f"seed {seed}: R {R}"
