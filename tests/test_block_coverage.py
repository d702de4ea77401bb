"""Block coverage (KARA_TRACK_KEPT): which decode tokens a request still holds, per block.

The tracker alone against a direct simulation, then through real SGLang: Kara keeps its
budget in every compressed block, StreamingLLM empties the middle.
"""

import random

import pytest

from kara_sglang.kept_positions import KeptPositions


def test_tracker_follows_compressions_of_fresh_and_already_compressed_regions():
    for seed in range(50):
        rng = random.Random(seed)
        tracker, held, decoded = KeptPositions(), [], 0
        for _ in range(rng.randint(1, 8)):
            n = rng.randint(1, 40)
            tracker.on_decode(n)
            held += range(decoded, decoded + n)
            decoded += n
            start = rng.randrange(len(held))
            n_keys = rng.randint(1, len(held) - start)
            keep = sorted(rng.sample(range(n_keys), rng.randint(0, n_keys)))
            region = held[start:start + n_keys]
            held[start:start + n_keys] = [region[k] for k in keep]
            tracker.apply(start, n_keys, keep)
            assert tracker.decode_index == held, f"seed {seed}"
        block = rng.randint(1, 16)
        counts = [0] * ((tracker.decoded + block - 1) // block)
        for index in held:
            counts[index // block] += 1
        assert tracker.per_block(block) == counts, f"seed {seed}"


@pytest.mark.sglang
@pytest.mark.newest_release  # the tracker reads what the server reports
def test_server_reports_blocks_kara_never_empties_one_streaming_does(tiny_model, monkeypatch):
    from support.engines import flush, make_engine, use_cpu_sglang

    use_cpu_sglang()
    W, U, KEEP = 32, 8, 0.25
    monkeypatch.setenv("KARA_TRACK_KEPT", str(W))  # read by the spawned scheduler
    n = 6 * W + U
    params = dict(temperature=0, max_new_tokens=n, ignore_eos=True)
    engine = make_engine(tiny_model, kv_policy="kara", kara_window=W, kara_buffer=U, kara_keep_ratio=KEEP,
                         kara_chunk_size=2)
    try:
        out = engine.generate(input_ids=[[5, 6, 7, 8, 9]], sampling_params=params)[0]
        flush(engine)
    finally:
        engine.shutdown()
    meta = out["meta_info"]
    blocks = meta["kv_kept_per_block"][-1]
    assert all(v is None for v in meta["kv_kept_per_block"][:-1])
    kept_decode = meta["kv_tokens_kept"][-1] - meta["prompt_tokens"]
    # The last token's KV is written by a step that never ran (the request finished first).
    assert sum(blocks) in (kept_decode - 1, kept_decode)
    compressed = meta["kv_tokens_evicted"][-1] // (W - int(W * KEEP))
    assert compressed >= 4
    assert blocks[:compressed] == [int(W * KEEP)] * compressed  # one window = one block
    assert all(b == W for b in blocks[compressed:-1])  # the uncompressed tail, whole


@pytest.mark.sglang
@pytest.mark.newest_release  # the tracker reads what the server reports
def test_streaming_policy_empties_the_middle_blocks(tiny_model, monkeypatch):
    from support.engines import flush, make_engine, use_cpu_sglang

    use_cpu_sglang()
    W, U, BUDGET, SINK = 32, 8, 40, 4
    monkeypatch.setenv("KARA_TRACK_KEPT", str(W))
    engine = make_engine(tiny_model, kv_policy="streaming", kara_window=W, kara_buffer=U, kara_budget=BUDGET,
                         kara_sink=SINK)
    try:
        out = engine.generate(input_ids=[[5, 6, 7, 8, 9]],
                              sampling_params=dict(temperature=0, max_new_tokens=8 * W, ignore_eos=True))[0]
        flush(engine)
    finally:
        engine.shutdown()
    blocks = out["meta_info"]["kv_kept_per_block"][-1]
    assert blocks[0] >= SINK and sum(blocks) <= BUDGET + U
    assert blocks[1:5] == [0, 0, 0, 0]


def test_tracker_skips_recall_buffer_columns():
    """Recall with a tier: the compression that creates a row's recall buffer keeps R more
    columns after the policy's ones; they hold no decode token, and later regions start past
    them (their column offsets count them)."""
    tracker = KeptPositions()
    tracker.on_decode(32)
    tracker.apply(0, 24, [0, 5, 9, 23], recall_buffer=20)  # columns: 4 kept, 20 buffer, 8 tail
    assert tracker.decode_index == [0, 5, 9, 23] + list(range(24, 32))
    tracker.on_decode(16)
    tracker.apply(4 + 20, 24, [1, 2])  # the next region: the old tail and the new tokens
    assert tracker.decode_index == [0, 5, 9, 23, 25, 26]
    assert tracker.per_block(8) == [2, 1, 1, 2, 0, 0]


@pytest.mark.sglang
@pytest.mark.newest_release  # the tracker reads what the server reports
def test_server_reports_blocks_with_a_recall_tier(tiny_model, monkeypatch):
    """KARA_TRACK_KEPT with --kara-recall-tier-tokens: the first compression makes R evicted
    tokens' slots the row's recall buffer (columns that are no decode tokens); the later
    compressions' regions lie past them. Used to crash the scheduler (IndexError)."""
    from support.engines import flush, make_engine, use_cpu_sglang

    use_cpu_sglang()
    W, U, KEEP, R = 32, 8, 0.25, 20
    monkeypatch.setenv("KARA_TRACK_KEPT", str(W))
    engine = make_engine(tiny_model, kv_policy="kara", kara_window=W, kara_buffer=U, kara_keep_ratio=KEEP,
                         kara_chunk_size=2, kara_recall_tokens=R, kara_recall_kv="bits8",
                         kara_recall_tier_tokens=50_000)
    try:
        out = engine.generate(input_ids=[[5, 6, 7, 8, 9]],
                              sampling_params=dict(temperature=0, max_new_tokens=4 * W + U, ignore_eos=True))[0]
        flush(engine)
    finally:
        engine.shutdown()
    meta = out["meta_info"]
    blocks = meta["kv_kept_per_block"][-1]
    kept_columns = meta["kv_tokens_kept"][-1] - meta["prompt_tokens"]  # the buffer's R included
    assert sum(blocks) in (kept_columns - R - 1, kept_columns - R)
    assert blocks[:3] == [int(W * KEEP)] * 3  # one window = one block, buffer or not
