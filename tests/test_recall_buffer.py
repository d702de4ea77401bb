"""Refreshing recall buffers (kernels/recall_buffer.py) over several decode steps, on fresh
random tiers and selections each run (the seed is in every failure message): every pick ends up
held with its dequantised K and V, only picks not held before are written, into positions whose
column was not picked, and requests that are not live are left alone."""

import random

import pytest
import torch

from kara_kernels.recall_buffer import refresh_recall_buffer
from test_recall_tier_kernels import _dequant64, _tier, _unpack

SENTINEL = 1024.0  # exact in every pool dtype: a slot still holding it was not written


def _next_selection(gen, previous, n_tier, R, keep):
    """Distinct columns below ``n_tier``: about ``keep`` of ``previous`` (their order shuffled)
    and new ones, R in all."""
    kept = [c for c in previous if c >= 0 and torch.rand(1, generator=gen).item() < keep]
    others = [c for c in torch.randperm(n_tier, generator=gen).tolist() if c not in kept]
    picks = kept + others[:R - len(kept)]
    return [picks[i] for i in torch.randperm(len(picks), generator=gen).tolist()]


@pytest.mark.parametrize("bits, dtype, R, block_w", [(4, torch.bfloat16, 8, None), (2, torch.float32, 5, None),
                                                    (8, torch.float16, 40, None), (4, torch.float32, 40, 4)])
def test_refresh_writes_only_new_picks_into_unpicked_positions_and_every_pick_is_held(bits, dtype, R, block_w):
    seed = random.randrange(2 ** 31)
    gen = torch.Generator().manual_seed(seed)
    Hkv, D, Dv, T, pool = 2, 64, 96, 240, 400
    tier = [t[1] for t in _tier(2, T, Hkv, D, Dv, bits, gen)]
    keys = _dequant64(_unpack(tier[0], bits), tier[1], tier[2])
    vals = _dequant64(_unpack(tier[3], bits), tier[4], tier[5])
    rows, tier_lens = torch.tensor([2, 0, 3]), torch.tensor([R + 30, R + 3, R])
    B = len(rows)
    tier_table = torch.zeros(4, 80, dtype=torch.int64)
    perm = torch.randperm(T, generator=gen)
    for b in range(B):
        tier_table[rows[b], :int(tier_lens[b])] = perm[b * 80:b * 80 + int(tier_lens[b])]
    buffer_slots = torch.zeros(4, R, dtype=torch.int64)
    buffer_slots[rows] = (torch.randperm(pool - 1, generator=gen)[:B * R] + 1).view(B, R)
    held = torch.full((4, Hkv, R), -1, dtype=torch.int32)
    counts = torch.zeros(2, dtype=torch.int64)
    previous = [[[] for _ in range(Hkv)] for _ in range(B)]
    for step in range(6):
        live = (torch.rand(B, generator=gen) < 0.8).to(torch.int32) if step else torch.ones(B, dtype=torch.int32)
        sel = torch.full((B, Hkv, R), -1, dtype=torch.int64)
        for b in range(B):
            for h in range(Hkv):
                picks = _next_selection(gen, previous[b][h], int(tier_lens[b]), R, keep=0.7)
                if step == 3 and b == 0:  # fewer picks than the buffer: some positions stay as they are
                    picks = picks[:R // 2]
                sel[b, h, :len(picks)] = torch.tensor(picks)
                if live[b]:
                    previous[b][h] = picks
        if step == 4:
            sel[1, 0, 0] = int(tier_lens[1])  # past the count: no pick
        k = torch.randn(pool, Hkv, D, generator=gen).to(dtype)
        v = torch.randn(pool, Hkv, Dv, generator=gen).to(dtype)
        k[buffer_slots[rows].flatten()] = SENTINEL
        v[buffer_slots[rows].flatten()] = SENTINEL
        k0, v0, held0, counts0 = k.clone(), v.clone(), held.clone(), counts.clone()
        refresh_recall_buffer(sel, held, tier_table, rows, tier_lens, live, buffer_slots, *tier, k, v, bits,
                              block_w=block_w, counts=counts)
        picks_seen = written_seen = 0
        where = f"seed {seed}, step {step}"
        changed = ((k != k0).flatten(1).any(1) | (v != v0).flatten(1).any(1)).nonzero().flatten().tolist()
        assert set(changed) <= set(buffer_slots[rows].flatten().tolist()), f"{where}: wrote outside the buffers"
        for b in range(B):
            row = int(rows[b])
            if not live[b]:
                assert torch.equal(held[row], held0[row]), f"{where}: a request that is not live changed"
                assert (k[buffer_slots[row]] == SENTINEL).all() and (v[buffer_slots[row]] == SENTINEL).all(), where
                continue
            for h in range(Hkv):
                picks = [c for c in sel[b, h].tolist() if 0 <= c < int(tier_lens[b])]
                before, after = held0[row, h].tolist(), held[row, h].tolist()
                picks_seen += len(picks)
                written_seen += len(set(picks) - set(before))
                assert set(picks) <= set(after), f"{where}: a pick is not held"
                assert len({c for c in after if c >= 0}) == sum(c >= 0 for c in after), f"{where}: held twice"
                written = [j for j in range(R) if (k[buffer_slots[row, j], h] != SENTINEL).any()]
                # Exactly the picks not held before, each in a position whose column was not picked.
                assert sorted(after[j] for j in written) == sorted(set(picks) - set(before)), where
                assert all(before[j] not in picks for j in written), f"{where}: overwrote a picked column"
                assert all(after[j] == before[j] for j in range(R) if j not in written), where
                for j in written:
                    t, slot = int(tier_table[row, after[j]]), int(buffer_slots[row, j])
                    for got, want in ((k[slot, h], keys[t, h]), (v[slot, h], vals[t, h])):
                        ulp = want.abs() * torch.finfo(dtype).eps + 1e-6
                        assert bool(((got.double() - want).abs() <= ulp).all()), f"{where}: position {j}"
                unwritten_v = [j for j in range(R) if j not in written]
                assert (v[buffer_slots[row, unwritten_v], h] == SENTINEL).all(), f"{where}: V written, K not"
        # The hit-rate counters: live requests' picks, and those written (not held before).
        assert (counts - counts0).tolist() == [picks_seen, written_seen], where


def test_refresh_refuses_a_held_map_of_the_wrong_shape():
    k = torch.zeros(10, 2, 64)
    tier = [t[1] for t in _tier(2, 10, 2, 64, 64, 4, torch.Generator().manual_seed(0))]
    with pytest.raises(ValueError, match="held must be int32"):
        refresh_recall_buffer(torch.zeros(1, 2, 4, dtype=torch.int64), torch.zeros(2, 2, 3, dtype=torch.int32),
                              torch.zeros(2, 8, dtype=torch.int64), torch.zeros(1, dtype=torch.int64),
                              torch.ones(1, dtype=torch.int64), torch.ones(1, dtype=torch.int32),
                              torch.zeros(2, 4, dtype=torch.int64), *tier, k, k.clone(), 4)
