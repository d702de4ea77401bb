"""CASK: the merge kernel, the core/scratch selection rule, whole compressions, real SGLang."""

import pytest
import torch

from kara_kernels import merge_kv, merge_kv_reference


def random_merges(gen, n_merges, max_src, num_slots):
    """Disjoint groups of slots; each merge writes into the slot of one of its members."""
    perm = torch.randperm(num_slots, generator=gen)
    src = torch.zeros(n_merges, max_src, dtype=torch.int64)
    weights = torch.zeros(n_merges, max_src, dtype=torch.float32)
    n_src = torch.zeros(n_merges, dtype=torch.int32)
    dst = torch.zeros(n_merges, dtype=torch.int64)
    used = 0
    for m in range(n_merges):
        n = int(torch.randint(0 if m == 0 else 1, max_src + 1, (1,), generator=gen))
        members = perm[used: used + max(n, 1)]
        used += max(n, 1)
        src[m, :n] = members[:n]
        src[m, n:] = perm[-1]  # padding: never read
        w = torch.rand(n, generator=gen) + 0.05
        weights[m, :n] = w / w.sum()
        weights[m, n:] = float("nan")  # padding weights are never read either
        n_src[m] = n
        dst[m] = members[int(torch.randint(0, max(n, 1), (1,), generator=gen))]
    return dst, src, weights, n_src


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads, head_dim", [(2, 16), (3, 8), (1, 64)])
def test_merge_kv_matches_float64_reference(dtype, heads, head_dim, device):
    gen = torch.Generator().manual_seed(torch.seed())
    n_merges, max_src, layers = 7, 5, 3
    num_slots = n_merges * max_src + 9
    buffers = [torch.randn(num_slots, heads, head_dim, generator=gen).to(dtype).to(device)
               for _ in range(2 * layers)]
    expected = [b.clone().cpu() for b in buffers]
    dst, src, weights, n_src = random_merges(gen, n_merges, max_src, num_slots)
    merge_kv_reference(expected, dst, src, weights, n_src)
    merge_kv(buffers, dst.to(device), src.to(device), weights.to(device), n_src.to(device), block=32)
    written = {int(dst[m]) for m in range(n_merges) if int(n_src[m]) > 0}
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for got, want in zip(buffers, expected):
        got = got.cpu()
        others = [s for s in range(num_slots) if s not in written]
        assert torch.equal(got[others], want[others])  # every other row untouched
        rows = sorted(written)
        assert torch.allclose(got[rows].double(), want[rows].double(), rtol=tol, atol=tol)
