"""Tensor parallelism: two real ``torch.distributed`` ranks (gloo, spawned processes), each
holding half of the heads of the same K and queries, choose the same keep sets.

Each rank runs whole compressions on its own toy paged pool (``SyntheticDecode`` with
``head_shard``), the way each SGLang TP rank owns its ``req_to_token`` and free list. After
every step the ranks' ``req_to_token`` tables, free lists and (for page size > 1, where
compaction moves K/V) the surviving tokens must be identical. The same run without the
score all-reduce must diverge: otherwise this test could not see a missing reduction.
"""

import os
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kara_sglang.config import KaraConfig
from kara_sglang.synthetic import SyntheticDecode
from kara_sglang.tp import ScoreReducer

CONFIGS = {
    "kara": dict(policy="kara", window=24, buffer=6, keep_ratio=0.25, chunk_size=3, num_vote_layers=2),
    "cask": dict(policy="cask", window=24, buffer=6, keep_ratio=0.25, num_vote_layers=2),
}
PROMPTS = [5, 17, 9]
STEPS = 75  # two compressions per request at W + U = 30


def _rank(rank, world, init_file, out_dir, name, page_size, reduce):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        group = dist.new_group([0, 1], backend="gloo")
        sim = SyntheticDecode(KaraConfig(**CONFIGS[name]), PROMPTS, num_layers=3, q_heads=8, kv_heads=2,
                              page_size=page_size, seed=1234, head_shard=(rank, world))
        reducer = ScoreReducer(group, group, world, rank)
        reduced = []
        if reduce:
            def reduce_and_keep(flat):
                reducer(flat)
                reduced.append(flat.clone())
            sim.compressor.reduce_scores = reduce_and_keep
        trace = []
        for _ in range(STEPS):
            due = sim.step()
            trace.append({
                "due": [(d.pool_row, d.task.kv_start) for d in due],
                "req_to_token": sim.req_to_token.clone(),
                "free_pages": list(sim.alloc.free_pages),
                "positions": [sim.stored_positions(r) for r in sim.requests],
            })
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
            pickle.dump({"trace": trace, "reduced": reduced, "calls": reducer.calls}, f)
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path, name, page_size, reduce=True):
    mp.spawn(_rank, args=(2, str(tmp_path / "init"), str(tmp_path), name, page_size, reduce),
             nprocs=2, join=True)
    return [pickle.load(open(tmp_path / f"rank{r}.pkl", "rb")) for r in range(2)]


def full_head_scores(name, page_size):
    """The scores one rank holding every head computes for the same steps (no reduction)."""
    sim = SyntheticDecode(KaraConfig(**CONFIGS[name]), PROMPTS, num_layers=3, q_heads=8, kv_heads=2,
                          page_size=page_size, seed=1234)
    seen = []
    sim.compressor.reduce_scores = lambda flat: seen.append(flat.clone())
    for _ in range(STEPS):
        sim.step()
    return seen


@pytest.mark.parametrize("name, page_size", [("kara", 1), ("kara", 4), ("cask", 4)])
def test_ranks_choose_the_same_keep_sets_and_stay_identical(tmp_path, name, page_size):
    rank0, rank1 = run_two_ranks(tmp_path, name, page_size)
    events = 0
    for step0, step1 in zip(rank0["trace"], rank1["trace"]):
        assert step0["due"] == step1["due"]
        assert torch.equal(step0["req_to_token"], step1["req_to_token"])
        assert step0["free_pages"] == step1["free_pages"]
        # Each rank's own K/V (its heads) holds the same tokens in the same slots.
        assert step0["positions"] == step1["positions"]
        events += len(step0["due"])
    assert events >= 2 * len(PROMPTS)
    # One collective per compression step, batched over all its windows.
    steps_with_work = sum(1 for s in rank0["trace"] if s["due"])
    assert rank0["calls"] == rank1["calls"] == steps_with_work
    # The reduced score is the full-head score a single rank would compute.
    full = full_head_scores(name, page_size)
    assert len(full) == len(rank0["reduced"])
    for ours, ref in zip(rank0["reduced"], full):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-4)


def test_without_the_reduction_the_ranks_diverge(tmp_path):
    rank0, rank1 = run_two_ranks(tmp_path, "kara", 1, reduce=False)
    assert any(not torch.equal(a["req_to_token"], b["req_to_token"])
               for a, b in zip(rank0["trace"], rank1["trace"]))
