"""Triton kernels against float64 torch references, on fresh random inputs."""

import pytest
import torch

from kara_kernels import compact_kv, compact_kv_reference, window_scores, window_scores_reference

SCORER_CASES = [
    # (q_heads, kv_heads, head_dim, n_vote, n_queries, n_keys, dtype)
    (8, 8, 32, 1, 40, 33, torch.bfloat16),     # GQA 1 (or group-pooled queries)
    (8, 4, 32, 2, 24, 16, torch.float16),      # GQA 2
    (8, 2, 16, 2, 70, 64, torch.bfloat16),     # GQA 4, two query blocks
    (16, 2, 32, 1, 17, 130, torch.bfloat16),   # GQA 8, three key blocks, ragged
    (4, 4, 64, 3, 96, 80, torch.float16),
]


def rel_err(out, ref):
    return float((out.double() - ref).norm() / ref.norm())


@pytest.mark.parametrize("case", SCORER_CASES)
def test_window_scores_match_float64_reference(case, device):
    q_heads, kv_heads, head_dim, n_vote, n_queries, n_keys, dtype = case
    seed = 12
    gen = torch.Generator().manual_seed(seed)
    rows, windows, slots_total = 5, 3, 4 * n_keys + 7
    queries = (torch.randn(rows, n_vote, n_queries, q_heads, head_dim, generator=gen) * 2).to(dtype).to(device)
    k_buffers = [(torch.randn(slots_total, kv_heads, head_dim, generator=gen) * 2).to(dtype).to(device)
                 for _ in range(n_vote)]
    key_slots = torch.stack([torch.randperm(slots_total, generator=gen)[:n_keys] for _ in range(windows)])
    key_slots = key_slots.to(torch.int32).to(device)
    query_rows = torch.randperm(rows, generator=gen)[:windows].to(torch.int32).to(device)
    block = 16 if device == "cpu" else 64
    out = window_scores(queries, query_rows, k_buffers, key_slots, head_dim ** -0.5,
                        block_q=block, block_k=block)
    ref = window_scores_reference(queries.cpu(), query_rows.cpu(), [k.cpu() for k in k_buffers],
                                  key_slots.cpu(), head_dim ** -0.5)
    assert out.shape == (windows, n_keys) and out.dtype == torch.float32, f"seed {seed}"
    assert bool(torch.isfinite(out).all()), f"seed {seed}"
    assert rel_err(out.cpu(), ref) < 1e-2, f"seed {seed}"
    # Every key column was written and every query's probabilities were counted once.
    expected = n_vote * q_heads * n_queries
    assert torch.allclose(out.sum(dim=1).double().cpu(), torch.full((windows,), float(expected), dtype=torch.float64), rtol=1e-4), f"seed {seed}"


# MLA (DeepSeek-V2/V3): one latent "KV head" of kv_lora_rank + rope dims, every query head in
# its group; head dims that are not powers of two, the tail masked.
MLA_SCORER_CASES = [
    # (q_heads, head_dim, n_vote, n_queries, n_keys, dtype)
    (16, 576, 1, 24, 40, torch.bfloat16),   # DeepSeek-V3's 512 + 64
    (4, 80, 2, 40, 33, torch.bfloat16),     # the tiny test model's 64 + 16
    (8, 100, 1, 17, 20, torch.float16),     # 64 + 36, the tail padded to 64 and masked
    (2, 24, 2, 20, 30, torch.float32),      # 16 + 8, padded to 16
]


@pytest.mark.parametrize("case", MLA_SCORER_CASES)
def test_window_scores_mla_latent_matches_float64_reference(case, device):
    """Fresh random inputs each run (the seed is in the failure message)."""
    import random

    q_heads, head_dim, n_vote, n_queries, n_keys, dtype = case
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    rows, windows, slots_total = 4, 2, 3 * n_keys + 5
    queries = (torch.randn(rows, n_vote, n_queries, q_heads, head_dim, generator=gen) * 2).to(dtype).to(device)
    # The latent buffer of one layer: [slots, 1, head_dim], read as one KV head.
    k_buffers = [(torch.randn(slots_total, 1, head_dim, generator=gen) * 2).to(dtype).to(device)
                 for _ in range(n_vote)]
    key_slots = torch.stack([torch.randperm(slots_total, generator=gen)[:n_keys] for _ in range(windows)])
    key_slots = key_slots.to(torch.int32).to(device)
    query_rows = torch.randperm(rows, generator=gen)[:windows].to(torch.int32).to(device)
    scale = 0.7 * head_dim ** -0.5  # MLA's scale is not 1/sqrt(head_dim) (YaRN mscale)
    block = 16 if device == "cpu" else 64
    out = window_scores(queries, query_rows, k_buffers, key_slots, scale, block_q=block, block_k=block)
    ref = window_scores_reference(queries.cpu(), query_rows.cpu(), [k.cpu() for k in k_buffers],
                                  key_slots.cpu(), scale)
    assert out.shape == (windows, n_keys) and bool(torch.isfinite(out).all()), f"seed {seed}"
    assert rel_err(out.cpu(), ref) < 1e-2, f"seed {seed}"
    expected = n_vote * q_heads * n_queries
    assert torch.allclose(out.sum(dim=1).double().cpu(), torch.full((windows,), float(expected), dtype=torch.float64),
                          rtol=1e-4), f"seed {seed}"


def test_window_scores_accumulate_into_out(device):
    seed = 13
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 1, 16, 4, 16, generator=gen).to(device)
    k = [torch.randn(64, 4, 16, generator=gen).to(device)]
    slots = torch.randperm(64, generator=gen)[:20].view(1, 20).to(device)
    rows = torch.tensor([1], device=device)
    first = window_scores(q, rows, k, slots, 0.25, block_q=16, block_k=16)
    both = window_scores(q, rows, k, slots, 0.25, out=first.clone(), block_q=16, block_k=16)
    assert torch.allclose(both, 2 * first, rtol=1e-5), f"seed {seed}"


def test_window_scores_refuses_bad_shapes(device):
    q = torch.zeros(1, 2, 4, 6, 16, device=device)
    k = [torch.zeros(8, 4, 16, device=device)] * 2
    slots = torch.zeros(1, 4, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="do not group"):
        window_scores(q, torch.zeros(1, dtype=torch.int32, device=device), k, slots, 1.0)
    with pytest.raises(ValueError, match="voting layers"):
        window_scores(q[:, :1].contiguous(), torch.zeros(1, dtype=torch.int32, device=device), k, slots, 1.0)


def random_left_slides(gen, n_req, max_moves, num_slots):
    """Moves of a real compaction: for each request, kept positions slide left."""
    src = torch.zeros(n_req, max_moves, dtype=torch.int64)
    dst = torch.zeros(n_req, max_moves, dtype=torch.int64)
    n_moves = torch.zeros(n_req, dtype=torch.int32)
    slots = torch.randperm(num_slots, generator=gen)
    for r in range(n_req):
        span = int(torch.randint(2, 2 * max_moves, (1,), generator=gen))
        owned = slots[r * 2 * max_moves: r * 2 * max_moves + span]  # this request's positions
        n = int(torch.randint(1, min(span, max_moves) + 1, (1,), generator=gen))
        kept = torch.randperm(span, generator=gen)[:n].sort().values
        src[r, :n] = owned[kept]
        dst[r, :n] = owned[:n]
        n_moves[r] = n
    return src, dst, n_moves


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("heads, head_dim", [(2, 16), (3, 8), (1, 64)])
def test_compact_kv_matches_sequential_reference(dtype, heads, head_dim, device):
    seed = 14
    gen = torch.Generator().manual_seed(seed)
    n_req, max_moves, layers = 4, 12, 3
    num_slots = n_req * 2 * max_moves + 5
    buffers = [torch.randn(num_slots, heads, head_dim, generator=gen).to(dtype).to(device)
               for _ in range(2 * layers)]
    expected = [b.clone().cpu() for b in buffers]
    src, dst, n_moves = random_left_slides(gen, n_req, max_moves, num_slots)
    compact_kv_reference(expected, src, dst, n_moves)
    compact_kv(buffers, src.to(device), dst.to(device), n_moves.to(device), block=32)
    for got, want in zip(buffers, expected):
        assert torch.equal(got.cpu(), want), f"seed {seed}"  # moved rows exact, every other row untouched


def test_compact_kv_skips_padding_rows(device):
    buffers = [torch.arange(40, dtype=torch.float32, device=device).view(10, 2, 2)]
    before = buffers[0].clone()
    src = torch.tensor([[5, 9]], device=device)
    dst = torch.tensor([[1, 2]], device=device)
    compact_kv(buffers, src, dst, torch.tensor([1], dtype=torch.int32, device=device))
    expected = before.clone()
    expected[1] = before[5]
    assert torch.equal(buffers[0], expected)
