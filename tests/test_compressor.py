"""Whole compressions on a toy paged pool: the right tokens survive, nothing leaks.

The expected keep sets are built here by hand from the raw draws (each decode step's raw
query heads, recorded as they are captured, and the K rows at the window's slots): float64
softmax scores over the voting layers the configuration names, then the policy's rule written
out in plain Python (top-k; Token2Chunk's seed, grow, merge, fill; StreamingLLM's sink +
newest). Nothing of the policy or the scorer under test computes them. Every draw is seeded
and a failure names its seed.
"""

import math

import pytest
import torch

from kara_sglang.config import KaraConfig
from kara_sglang.synthetic import SyntheticDecode

NUM_LAYERS = 3
POLICY_CONFIGS = {
    "kara": dict(policy="kara", window=24, buffer=6, keep_ratio=0.25, chunk_size=3, num_vote_layers=2),
    "kara-gamma1": dict(policy="kara", window=16, buffer=4, keep_ratio=0.5, chunk_size=1),
    "threshold": dict(policy="threshold", budget=20, buffer=5, window=64, num_vote_layers=1),
    "streaming": dict(policy="streaming", budget=12, sink=2, buffer=5, window=64),
}
# Written out, not resolved: in 3 layers, 2 voting layers are the last two, 4 are all three.
VOTE_LAYERS = {"kara": (1, 2), "kara-gamma1": (0, 1, 2), "threshold": (2,), "streaming": ()}
# Per configuration: (tokens kept of each region, Token2Chunk seeds, gamma) as the rule
# defines them: budget = round(keep_ratio * W) (threshold: budget - U, the newest U are kept
# apart), seeds = floor(chunk_fraction * budget / gamma).
KEEP_RULE = {"kara": (6, 1, 3), "kara-gamma1": (8, 0, 1), "threshold": (15, 0, 1), "streaming": (12, 0, 1)}


class RawQueries:
    """Every raw query the simulation captures, per (pool row, voting layer), in decode order."""

    def __init__(self, sim):
        self.seen = {}
        capture = sim.queries.capture

        def recording(layer_id, q, rows, ring_pos):
            for r, row in enumerate(rows.tolist()):
                self.seen.setdefault((row, layer_id), []).append(q[r].detach().double().cpu().clone())
            return capture(layer_id, q, rows, ring_pos)

        sim.queries.capture = recording

    def newest(self, row, layer, n):
        """``[n, q_heads, head_dim]``: the newest ``n`` queries of ``row`` at ``layer``."""
        return torch.stack(self.seen[(row, layer)][-n:])


def float64_scores(sim, raw, item, layers, group):
    """Importance of each key of ``item``'s region: per voting layer, query and head, the
    softmax of q.k / sqrt(D) over the region's keys, summed (``group``: one query per KV head,
    the mean of its query heads)."""
    t = item.task
    slots = sim.req_to_token[item.pool_row, t.kv_start: t.kv_start + t.n_keys].long().cpu()
    total = torch.zeros(t.n_keys, dtype=torch.float64)
    for layer in layers:
        q = raw.newest(item.pool_row, layer, t.n_queries)  # [nq, Hq, D]
        k = sim.k[layer][slots].double().cpu()  # [n_keys, Hkv, D]
        hkv = k.shape[1]
        if group:
            q = q.view(q.shape[0], hkv, -1, q.shape[-1]).mean(dim=2)
        else:
            k = k.repeat_interleave(q.shape[1] // hkv, dim=1)
        logits = torch.einsum("qhd,khd->qhk", q, k) / math.sqrt(q.shape[-1])
        total += logits.softmax(dim=-1).sum(dim=(0, 1))
    return total.tolist()


def top(scores, k, exclude=()):
    order = sorted((i for i in range(len(scores)) if i not in exclude), key=lambda i: -scores[i])
    return set(order[:k])


def token2chunk_by_hand(scores, budget, seeds, gamma):
    """Seeds (the top ``seeds`` tokens) grow ``gamma - 1`` times towards the higher neighbour
    (left on a tie, the other side at an edge); the union of chunks is kept, then the best
    other tokens fill the budget."""
    n = len(scores)
    chunk = set()
    for s in top(scores, seeds):
        lo = hi = s
        for _ in range(gamma - 1):
            left = scores[lo - 1] if lo > 0 else -math.inf
            right = scores[hi + 1] if hi + 1 < n else -math.inf
            if left >= right:
                lo -= 1
            else:
                hi += 1
        chunk |= set(range(lo, hi + 1))
    return sorted(chunk | top(scores, budget - len(chunk), exclude=chunk))


def expected_keep(name, sim, raw, item, group=True):
    budget, seeds, gamma = KEEP_RULE[name]
    n = item.task.n_keys
    if name == "streaming":
        sink = POLICY_CONFIGS[name]["sink"]
        return list(range(sink)) + list(range(n - (budget - sink), n))
    scores = float64_scores(sim, raw, item, VOTE_LAYERS[name], group)
    return token2chunk_by_hand(scores, budget, seeds, gamma)


def expected_layout(name, sim, raw, item):
    """Positions the request should hold after ``item``."""
    alive = sim.requests[item.pool_row].positions_alive
    t = item.task
    region = alive[t.kv_start: t.kv_start + t.n_keys]
    return alive[: t.kv_start] + [region[j] for j in expected_keep(name, sim, raw, item)] + alive[t.kv_start + t.n_keys:]


SEEDS = {(name, page): 1000 + 10 * i + j for i, name in enumerate(sorted(POLICY_CONFIGS))
         for j, page in enumerate((1, 4, 16))}


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("name", sorted(POLICY_CONFIGS))
def test_compression_keeps_the_selected_tokens_and_leaks_nothing(name, page_size, device):
    cfg = KaraConfig(**POLICY_CONFIGS[name])
    seed = SEEDS[(name, page_size)]
    prompts = [int(x) for x in torch.randint(0, 40, (3,), generator=torch.Generator().manual_seed(seed))]
    sim = SyntheticDecode(cfg, prompts, num_layers=NUM_LAYERS, page_size=page_size, seed=seed, device=device)
    raw = RawQueries(sim) if sim.queries is not None else None
    events = 0
    for step in range(110):
        where = f"seed {seed}, step {step}"
        sim.decode()
        due = sim.due()
        expected = {it.pool_row: expected_layout(name, sim, raw, it) for it in due}
        sim.compress(due)
        events += len(due)
        for req in sim.requests:
            stored = sim.stored_positions(req)
            if req.pool_row in expected:
                assert stored == expected[req.pool_row], where
            assert stored == req.positions_alive, where
            # Prompt intact, order kept, newest token last.
            assert stored[: req.state.prompt_len] == list(range(req.state.prompt_len)), where
            assert all(a < b for a, b in zip(stored, stored[1:])), where
            assert stored[-1] == req.state.next_position - 1, where
            if req.state.evicted:
                # The exact prefix released to the radix tree: exactly the leading columns
                # that still hold their own token (column j = position j).
                exact = next((j for j, p in enumerate(stored) if p != j), len(stored))
                assert int(sim.exact_prefix[req.pool_row]) == exact >= req.state.prompt_len, where
        # No leak mid-run: every page in use belongs to some request's live KV.
        assert sim.owned_pages() == sim.alloc.in_use, where
    assert events > 0, f"seed {seed}"
    sim.finish_all()
    assert sim.alloc.free_slots == sim.idle_free and not sim.alloc.in_use, f"seed {seed}"


def test_group_and_all_head_votes_both_work(device):
    """``group`` stores one query per KV head, the mean of its GQA group; ``all`` every query
    head. Both score as the float64 computation on the raw queries says, and differently: the
    first window's keep sets of the two modes differ on these draws."""
    seed = 4
    keep_sets = {}
    for m in ("group", "all"):
        cfg = KaraConfig(window=16, buffer=4, keep_ratio=0.5, chunk_size=2, vote_heads=m)
        sim = SyntheticDecode(cfg, [3], num_layers=2, device=device, seed=seed)
        raw = RawQueries(sim)
        for step in range(40):
            sim.decode()
            ring_row = sim.queries.data[0].double().cpu()  # [n_vote, ring, stored heads, D]
            for v, layer in enumerate((0, 1)):  # 2 layers: both vote
                q = raw.seen[(0, layer)][-1]  # [Hq=8, D]
                want = q.view(2, 4, -1).mean(dim=1) if m == "group" else q
                got = ring_row[v, (sim.requests[0].state.decoded - 1) % 20]
                assert torch.allclose(got, want, atol=1e-6), f"seed {seed}, mode {m}, step {step}"
            due = sim.due()
            for it in due:
                alive = sim.requests[0].positions_alive
                region = alive[it.task.kv_start: it.task.kv_start + it.task.n_keys]
                scores = float64_scores(sim, raw, it, (0, 1), group=m == "group")
                keep = token2chunk_by_hand(scores, 8, 2, 2)  # budget 8, floor(0.5 * 8 / 2) seeds of 2
                keep_sets.setdefault(m, [region[j] for j in keep])
                want_alive = alive[: it.task.kv_start] + [region[j] for j in keep] + alive[it.task.kv_start + 16:]
                sim.compress([it])
                assert sim.stored_positions(sim.requests[0]) == want_alive, f"seed {seed}, mode {m}, step {step}"
        assert sim.queries.data.shape[3] == (2 if m == "group" else 8)
        assert sim.requests[0].state.events == 2, f"seed {seed}, mode {m}"
    assert keep_sets["group"] != keep_sets["all"], f"seed {seed}: the modes kept the same tokens"
