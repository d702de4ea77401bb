import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kara_sglang.token2chunk import token2chunk, topk_sorted


@st.composite
def windows(draw):
    window = draw(st.integers(2, 96))
    budget = draw(st.integers(1, window))
    gamma = draw(st.integers(1, min(budget, 12)))
    num_chunks = draw(st.integers(0, budget // gamma))
    n = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31 - 1))
    ties = draw(st.booleans())
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, window, generator=gen)
    if ties:  # few distinct values: ties everywhere
        scores = (scores * 3).floor()
    return scores, budget, gamma, num_chunks


@settings(max_examples=300, deadline=None)
@given(windows())
def test_keep_set_is_budget_sized_sorted_distinct_and_in_range(case):
    scores, budget, gamma, num_chunks = case
    keep = token2chunk(scores, budget, gamma, num_chunks)
    assert keep.shape == (scores.shape[0], budget)
    assert keep.dtype == torch.int64
    assert bool((keep[:, 1:] > keep[:, :-1]).all())  # ascending, hence no duplicates
    assert int(keep.min()) >= 0 and int(keep.max()) < scores.shape[1]


@settings(max_examples=300, deadline=None)
@given(windows())
def test_each_seed_grows_a_full_chunk_of_gamma_that_is_kept(case):
    scores, budget, gamma, num_chunks = case
    keep = token2chunk(scores, budget, gamma, num_chunks)
    if num_chunks == 0 or gamma == 1:
        return
    window = scores.shape[1]
    seeds = scores.topk(num_chunks, dim=-1).indices
    for row in range(scores.shape[0]):
        kept = set(keep[row].tolist())
        for seed in seeds[row].tolist():
            # The seed sits inside a run of at least gamma kept tokens (merged runs may be longer).
            lo = hi = seed
            assert seed in kept
            while lo - 1 in kept:
                lo -= 1
            while hi + 1 in kept:
                hi += 1
            assert hi - lo + 1 >= min(gamma, window)


@settings(max_examples=200, deadline=None)
@given(windows())
def test_tokens_outside_chunks_are_the_best_remaining(case):
    scores, budget, gamma, num_chunks = case
    keep = token2chunk(scores, budget, gamma, 0)
    ref = topk_sorted(scores, budget)
    # With no chunks, every dropped token scores no higher than every kept one.
    for row in range(scores.shape[0]):
        kept = scores[row, keep[row]]
        dropped_mask = torch.ones(scores.shape[1], dtype=torch.bool)
        dropped_mask[keep[row]] = False
        if dropped_mask.any():
            assert float(scores[row, dropped_mask].max()) <= float(kept.min())
    assert keep.shape == ref.shape


def test_chunk_grows_toward_the_higher_neighbour():
    scores = torch.tensor([[0.0, 0.1, 0.0, 0.5, 1.0, 0.2, 0.0, 0.0, 0.9, 0.0]])
    # One chunk of 3 around the top token (4): neighbours 3 (0.5) > 5 (0.2), then 5 (0.2) > 2 (0.0).
    keep = token2chunk(scores, budget=4, chunk_size=3, num_chunks=1)
    assert keep.tolist() == [[3, 4, 5, 8]]  # chunk [3..5] plus the best single token, 8


def test_chunk_at_window_edge_grows_inward():
    scores = torch.tensor([[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    keep = token2chunk(scores, budget=3, chunk_size=3, num_chunks=1)
    assert keep.tolist() == [[0, 1, 2]]


def test_gamma_one_is_plain_topk():
    gen = torch.Generator().manual_seed(1)
    scores = torch.rand(3, 50, generator=gen)
    assert torch.equal(token2chunk(scores, 10, 1, 5), topk_sorted(scores, 10))
