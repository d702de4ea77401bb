"""Retraction, aborts and a seeded randomized stress run through real SGLang: zero leaks.

SGLang's strict busy/idle memory checks and Kara's double-free check are on (see
``support.engines.TEST_ENV``): any leak or double free kills the scheduler and the run.
"""

import asyncio
import random

import pytest

from support.engines import (assert_pool_back_to_idle, assert_pool_consistent, last, make_engine, pool_state,
                             tally_outcome, use_cpu_sglang)
from test_sglang_engine import KARA, greedy

pytestmark = pytest.mark.sglang

use_cpu_sglang()


def test_retraction_under_a_tiny_pool_still_finishes_every_request(tiny_model):
    # A low conservativeness admits requests on optimistic estimates, and a window of 96
    # lets each request grow to 140 tokens before its first compression: decode runs out.
    engine = make_engine(tiny_model, max_total_tokens=600, chunked_prefill_size=256,
                         schedule_conservativeness=0.02, **dict(KARA, kara_window=96, kara_buffer=24))
    try:
        rng = random.Random(3)
        prompts = [[rng.randrange(10, 500) for _ in range(20)] for _ in range(24)]
        outs = engine.generate(input_ids=prompts, sampling_params=greedy(150))
        assert all(o["meta_info"]["completion_tokens"] == 150 for o in outs)
        retractions = sum(o["meta_info"]["num_retractions"] for o in outs)
        import sglang

        if retractions == 0 and sglang.__version__ != "0.5.17":
            # Measured on 0.5.23: its admission keeps this workload from running the pool dry,
            # with overlap scheduling on or off. Retraction is tested on 0.5.17 (CI runs both).
            pytest.skip(f"SGLang {sglang.__version__} never ran this pool dry, so nothing was retracted")
        assert retractions > 0  # the pool really ran out
        # A retracted request is re-prefilled with full KV (its output so far becomes
        # untouchable prefix); every other one compressed.
        for o in outs:
            if o["meta_info"]["num_retractions"] == 0:
                assert last(o["meta_info"], "kv_tokens_evicted") > 0
        assert_pool_consistent(engine)
        assert_pool_back_to_idle(engine)
    finally:
        engine.shutdown()


async def _random_workload(engine, n_requests: int, seed: int):
    """Random prompt and output lengths, shared prefixes, per-request overrides and aborts."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(10, 500) for _ in range(rng.randrange(4, 60))] for _ in range(6)]
    results = {"done": 0, "aborted": 0, "evicted": 0}

    async def one(i):
        prompt = (rng.choice(prefixes) if rng.random() < 0.6 else []) + \
            [rng.randrange(10, 500) for _ in range(rng.randrange(1, 40))]
        params = greedy(rng.choice([1, 5, 30, 45, 80, 120, 200]))
        roll = rng.random()
        if roll < 0.1:
            params["custom_params"] = {"kv_policy": "none"}
        elif roll < 0.2:
            params["custom_params"] = {"kara_keep_ratio": rng.choice([0.125, 0.5, 1.0])}
        rid = f"stress-{seed}-{i}"
        abort_after = rng.random() * 0.5 if rng.random() < 0.15 else None
        await asyncio.sleep(rng.random() * 2.0)
        task = asyncio.ensure_future(engine.async_generate(input_ids=prompt, sampling_params=params, rid=rid))
        if abort_after is not None:
            await asyncio.sleep(abort_after)
            engine.tokenizer_manager.abort_request(rid=rid)
        await tally_outcome(task, results)

    await asyncio.gather(*(one(i) for i in range(n_requests)))
    return results


def run_stress(tiny_model, n_requests: int, seed: int, check_idle=None, **engine_args):
    """``check_idle(engine)``: further checks once the pool is back to idle."""
    engine = make_engine(tiny_model, max_total_tokens=4000, **engine_args)
    try:
        results = engine.loop.run_until_complete(_random_workload(engine, n_requests, seed))
        assert results["done"] + results["aborted"] == n_requests  # no request lost
        assert results["evicted"] > 0 and results["aborted"] > 0
        assert_pool_consistent(engine)
        assert_pool_back_to_idle(engine)
        if check_idle is not None:
            check_idle(engine)
        return results
    finally:
        engine.shutdown()


# The oldest release runs the paged one (page size 1 takes the same adapter path with whole
# pages of one token).
@pytest.mark.parametrize("page_size", [pytest.param(1, marks=pytest.mark.newest_release), 16])
def test_randomized_stress_500_requests_zero_leaks(tiny_model, page_size):
    run_stress(tiny_model, 500, seed=page_size, page_size=page_size, **KARA)


@pytest.mark.slow
def test_randomized_stress_2000_requests_zero_leaks(tiny_model):
    run_stress(tiny_model, 2000, seed=11, **KARA)


def _tier_idle(engine, horizon: int = 0):
    """The recall tier holds nothing once every request ended, after it stored windows, filled
    recall buffers, and fell back when full or (``horizon``) dropped requests' oldest pages: a
    horizon keeps each request's share small enough that this tier never fills."""
    state = pool_state(engine)
    assert state["recall_tier_tokens_held"] == 0 and state["recall_buffers"] == 0, state
    assert state["recall_tier_pages_held"] == 0, state
    assert state["recall_tier_tokens_stored"] > 0, state
    if horizon:
        assert state["recall_tier_dropped_tokens"] > 0, state
    else:
        assert state["recall_tier_fallback_tokens"] > 0, state
    assert state["recall_buffer_fills"] > 0, state
    assert 0 < state["recall_buffer_picks_written"] <= state["recall_buffer_picks"], state


@pytest.mark.slow
@pytest.mark.parametrize("n_requests", [100, 300, 2000])
# Without a horizon the tier is smaller than what a few long requests evict at once (each
# evicts ~24 tokens a window, up to ~5 windows), so windows fall back even at 100 requests: a
# 1,500-token tier never filled there (measured: no fallback at 100 requests, two stages).
@pytest.mark.parametrize("pages, horizon, tier_tokens", [(0, 0, 400), (2, 0, 400), (2, 32, 1500)])
def test_randomized_stress_with_the_recall_tier_zero_leaks(tiny_model, n_requests, pages, horizon, tier_tokens,
                                                            monkeypatch):
    """The stress workload with the GPU tier's design on the CPU: a 4-bit tier smaller than the
    evicted total (so windows fall back), 4 tokens recalled per layer and KV head through each
    request's recall buffer, ranked over every tier token or (``pages``) in two stages, the best
    2 pages' tokens (page bounds held and freed with the rows), and with ``horizon`` each
    request keeping only its last 32 evicted tokens (older pages dropped as windows come);
    SGLang's strict checks and Kara's double-free debug checks on (support.engines.TEST_ENV),
    and its recall-output check on every 8th decode step (on every step it took two thirds of
    the run; the engine suites check every step)."""
    monkeypatch.setenv("KARA_DEBUG_RECALL_EVERY", "8")  # the scheduler process inherits it
    run_stress(tiny_model, n_requests, seed=23, check_idle=lambda engine: _tier_idle(engine, horizon),
               kara_recall_tokens=4, kara_recall_kv="bits4",
               kara_recall_tier_tokens=tier_tokens, kara_recall_pages=pages, kara_recall_horizon=horizon, **KARA)


def _started_before_first_finish(engine, prompts, n_new):
    """How many requests had their first token before any request finished (all sent at once).
    Once one finishes the count is known: the others are aborted there (what the test measures
    is admission, and their remaining decode steps would be most of its time)."""
    started, finished = set(), []
    rids = [f"admission-{id(engine)}-{i}" for i in range(len(prompts))]

    async def one(i, prompt):
        try:
            gen = await engine.async_generate(input_ids=prompt, sampling_params=greedy(n_new), stream=True,
                                              rid=rids[i])
            async for chunk in gen:
                if chunk["output_ids"] and not finished:
                    started.add(i)
                if chunk["meta_info"].get("finish_reason"):
                    break
        except ValueError:  # aborted below, after the first finish
            return
        if not finished:
            finished.append(i)
            for j, rid in enumerate(rids):
                if j != i:
                    engine.tokenizer_manager.abort_request(rid=rid)

    async def run():
        await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))

    engine.loop.run_until_complete(run())
    assert len(finished) == 1
    return len(started)


def test_admission_reserves_only_what_a_compressed_request_can_grow_to(tiny_model):
    # A 900-token pool, 8 requests of 20 + 500 tokens sent at once. Vanilla reserves each
    # new request's full 500 tokens: 2 run before the first finishes. Kara 25% (W = 32) grows
    # a request by at most ~170 tokens, and reserving only that, SGLang starts 4. (Measured:
    # with the new-request cap removed, Kara also started only 2: the running-request cap
    # alone does not change who gets in first.)
    rng = random.Random(5)
    prompts = [[rng.randrange(10, 500) for _ in range(20)] for _ in range(8)]
    concurrent = {}
    for name, policy in (("vanilla", {}), ("kara", KARA)):
        engine = make_engine(tiny_model, max_total_tokens=900, **policy)
        try:
            concurrent[name] = _started_before_first_finish(engine, prompts, 500)
            assert_pool_back_to_idle(engine)
        finally:
            engine.shutdown()
    assert concurrent["kara"] > concurrent["vanilla"], concurrent
