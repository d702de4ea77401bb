"""Radix top-R selection (kernels/select_top.py) against a sort, on fresh random scores each run
(seed in every failure message): negative and positive scores, many exact ties at the
threshold, -inf columns, counts below, at and above R, a count past n_cols."""

import random

import pytest
import torch

from kara_kernels.select_top import select_top


def _expected(row, n, tokens):
    """The documented picks: the min(R, n) largest of the first n, ties lowest column first,
    in column order, then -1."""
    vals = row[:n].double()
    order = sorted(range(n), key=lambda i: (-float(vals[i]), i))[:min(tokens, n)]
    return sorted(order) + [-1] * (tokens - min(tokens, n))


@pytest.mark.parametrize("tokens, block, method", [(7, 16, "radix"), (40, 32, "radix"), (1, 64, "radix"),
                                                  (64, 1024, "radix"), (7, 0, "sorted"), (40, 0, "sorted"),
                                                  (1, 0, "sorted"), (128, 0, "sorted")])
def test_select_top_matches_a_sort(tokens, block, method):
    seed = random.randrange(2 ** 31)
    gen = torch.Generator().manual_seed(seed)
    B, H, C = 5, 3, 150
    rank = torch.randn(B, H, C, generator=gen) * 3
    # Coarse values give many exact ties; some rows all one value; -inf inside the count.
    rank[1] = torch.randint(-3, 4, (H, C), generator=gen).float()
    rank[2, 0] = 0.5
    rank[3, :, ::7] = float("-inf")
    rank[3, 1] = -0.0
    rank[3, 2, ::3] = 0.0
    lens = torch.tensor([150, 90, 6, 40, 500])  # 500: clipped to n_cols
    n_cols = 120
    got = select_top(rank, lens, tokens, n_cols=n_cols, block=block, method=method)
    assert got.dtype == torch.int64 and got.shape == (B, H, tokens)
    for b in range(B):
        n = min(int(lens[b]), n_cols)
        for h in range(H):
            assert got[b, h].tolist() == _expected(rank[b, h], n, tokens), f"seed {seed}: b={b} h={h}"


def test_select_top_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="float32"):
        select_top(torch.zeros(2, 2, 8, dtype=torch.float16), torch.tensor([8, 8]), 3)
    with pytest.raises(ValueError, match="n_cols"):
        select_top(torch.zeros(2, 2, 8), torch.tensor([8, 8]), 3, n_cols=9)
