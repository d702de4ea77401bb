"""Paged KV (page size 16), the baseline policies and longflow, through real SGLang.

One engine at a time: SGLang's ``Engine.shutdown()`` ends every scheduler process of the
test process.
"""

import pytest

from support.engines import assert_pool_back_to_idle, assert_pool_consistent, last, make_engine, shared_engine, use_cpu_sglang
from test_sglang_engine import KARA, PROMPTS, SYSTEM, U, W, greedy

pytestmark = pytest.mark.sglang

use_cpu_sglang()


def generate_once(model, prompts, sampling, shared=False, **engine_args):
    """Outputs and pool state (counters since the request: a shared engine's are differences)
    of one batch on an engine of its own, or on the session's shared engine (``shared``)."""
    engine = shared_engine(model, **engine_args) if shared else make_engine(model, **engine_args)
    try:
        before = assert_pool_consistent(engine)
        outs = engine.generate(prompts, sampling)
        state = assert_pool_consistent(engine)
        state["compression_events"] -= before["compression_events"]
        assert_pool_back_to_idle(engine)
        return outs, state
    finally:
        if not shared:
            engine.shutdown()


def test_page_size_16_gives_the_same_outputs_as_page_size_1(tiny_model):
    n = 3 * W + U + 7
    ref, _ = generate_once(tiny_model, PROMPTS, greedy(n), shared=True, **KARA)
    ours, state = generate_once(tiny_model, PROMPTS, greedy(n), page_size=16, **KARA)
    assert state["compression_events"] > 0
    for p, r in zip(ours, ref):
        # Same keep sets, KV moved into whole pages: attention sees the same tokens.
        assert last(p["meta_info"], "kv_tokens_evicted") == last(r["meta_info"], "kv_tokens_evicted") > 0
        assert p["output_ids"] == r["output_ids"]


LONGFLOW = dict(kv_policy="longflow", kara_budget=24, kara_buffer=8, kara_num_vote_layers=2)


@pytest.mark.newest_release  # the paged path is Kara's (above), run on every release
def test_longflow_page_size_16_gives_the_same_outputs_as_page_size_1(tiny_model):
    n = 24 + 5 * 8 + 3
    ref, _ = generate_once(tiny_model, PROMPTS[:3], greedy(n), shared=True, **LONGFLOW)
    ours, state = generate_once(tiny_model, PROMPTS[:3], greedy(n), page_size=16, **LONGFLOW)
    assert state["compression_events"] > 0
    for p, r in zip(ours, ref):
        # Same importance (same KV rows, read by slot), same evictions, KV kept in whole pages.
        assert last(p["meta_info"], "kv_tokens_evicted") == last(r["meta_info"], "kv_tokens_evicted") > 0
        assert p["output_ids"] == r["output_ids"]


@pytest.mark.parametrize("policy", [dict(kv_policy="threshold", kara_budget=24, kara_buffer=8),
                                    dict(kv_policy="streaming", kara_budget=24, kara_buffer=8),
                                    LONGFLOW])
@pytest.mark.newest_release  # the adapter path is Kara's, run on every release
def test_baseline_policies_run_through_the_scheduler(tiny_model, policy):
    outs, state = generate_once(tiny_model, PROMPTS[:3], greedy(100), shared=policy is LONGFLOW, **policy)
    assert state["compression_events"] > 0
    for o in outs:
        meta = o["meta_info"]
        # The decode cache stays between budget and budget + U.
        decode_kv = last(meta, "kv_tokens_kept") - meta["prompt_tokens"]
        assert 24 <= decode_kv <= 24 + 8
        assert last(meta, "kv_tokens_evicted") == 99 - decode_kv


def test_next_turn_matches_the_exact_prefix_of_a_compressed_reply(tiny_model):
    # StreamingLLM keeps its first `sink` decode tokens in place at every compression, so
    # the exact prefix of its reply is known: prompt + 4 tokens, not just the prompt.
    engine = make_engine(tiny_model, kv_policy="streaming", kara_budget=24, kara_buffer=8, kara_sink=4)
    try:
        prompt = SYSTEM + [11, 12]
        first = engine.generate(input_ids=prompt, sampling_params=greedy(100))
        assert last(first["meta_info"], "kv_tokens_evicted") > 0
        turn2 = engine.generate(input_ids=prompt + first["output_ids"] + [21, 22], sampling_params=greedy(5))
        assert turn2["meta_info"]["cached_tokens"] == len(prompt) + 4
        assert_pool_back_to_idle(engine)
    finally:
        engine.shutdown()


def test_without_the_radix_cache_nothing_leaks(tiny_model):
    outs, state = generate_once(tiny_model, PROMPTS[:3], greedy(2 * W + U + 5),
                                disable_radix_cache=True, **KARA)
    assert state["compression_events"] >= 3
    assert all(last(o["meta_info"], "kv_tokens_evicted") > 0 for o in outs)
