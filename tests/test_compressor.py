"""Whole compressions on a toy paged pool: the right tokens survive, nothing leaks."""

import pytest
import torch

from kara_kernels import window_scores_reference
from kara_sglang.config import KaraConfig
from kara_sglang.synthetic import SyntheticDecode

POLICY_CONFIGS = {
    "kara": dict(policy="kara", window=24, buffer=6, keep_ratio=0.25, chunk_size=3, num_vote_layers=2),
    "kara-gamma1": dict(policy="kara", window=16, buffer=4, keep_ratio=0.5, chunk_size=1),
    "threshold": dict(policy="threshold", budget=20, buffer=5, window=64, num_vote_layers=1),
    "streaming": dict(policy="streaming", budget=12, sink=2, buffer=5, window=64),
}


def expected_layout(sim, item):
    """Positions the request should hold after ``item``, from the float64 reference scorer."""
    req = sim.requests[item.pool_row]
    t = item.task
    alive = req.positions_alive
    scores = None
    if sim.policy.query_ring:
        slots = sim.req_to_token[item.pool_row, t.kv_start: t.kv_start + t.n_keys].long()[None]
        scores = window_scores_reference(
            sim.queries.data.cpu(), torch.tensor([item.query_row]),
            [k.cpu() for k in sim.queries.k_buffers_of(sim.k)], slots.cpu(), sim.head_dim ** -0.5)
    keep = sim.policy.select(scores, t, 1, "cpu")[0].tolist()
    region = alive[t.kv_start: t.kv_start + t.n_keys]
    return alive[: t.kv_start] + [region[j] for j in keep] + alive[t.kv_start + t.n_keys:]


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("name", sorted(POLICY_CONFIGS))
def test_compression_keeps_the_selected_tokens_and_leaks_nothing(name, page_size, device):
    cfg = KaraConfig(**POLICY_CONFIGS[name])
    seed = int(torch.randint(0, 2**31, (1,)))
    prompts = [int(x) for x in torch.randint(0, 40, (3,), generator=torch.Generator().manual_seed(seed))]
    sim = SyntheticDecode(cfg, prompts, num_layers=3, page_size=page_size, seed=seed, device=device)
    events = 0
    for _ in range(110):
        sim.decode()
        due = sim.due()
        expected = {it.pool_row: expected_layout(sim, it) for it in due}
        sim.compress(due)
        events += len(due)
        for req in sim.requests:
            stored = sim.stored_positions(req)
            if req.pool_row in expected:
                assert stored == expected[req.pool_row]
            assert stored == req.positions_alive
            # Prompt intact, order kept, newest token last.
            assert stored[: req.state.prompt_len] == list(range(req.state.prompt_len))
            assert all(a < b for a, b in zip(stored, stored[1:]))
            assert stored[-1] == req.state.next_position - 1
            if req.state.evicted:
                # The exact prefix released to the radix tree: exactly the leading columns
                # that still hold their own token (column j = position j).
                exact = next((j for j, p in enumerate(stored) if p != j), len(stored))
                assert int(sim.exact_prefix[req.pool_row]) == exact >= req.state.prompt_len
        # No leak mid-run: every page in use belongs to some request's live KV.
        assert sim.owned_pages() == sim.alloc.in_use
    assert events > 0
    sim.finish_all()
    assert sim.alloc.free_slots == sim.idle_free and not sim.alloc.in_use


def test_group_and_all_head_votes_both_work(device):
    for mode in ("group", "all"):
        cfg = KaraConfig(window=16, buffer=4, keep_ratio=0.5, chunk_size=2, vote_heads=mode)
        sim = SyntheticDecode(cfg, [3], num_layers=2, device=device)
        stored_heads = sim.queries.data.shape[3]
        assert stored_heads == (2 if mode == "group" else 8)
        for _ in range(40):
            sim.step()
        assert sim.requests[0].state.events == 2
