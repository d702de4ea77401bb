"""``--kv-policy kara`` on a hybrid sliding-window model through real SGLang (CPU engine).

A tiny random-weight gpt-oss (``support.swa_model``): sliding-window and full-attention layers
alternate, so SGLang keeps its KV in an ``SWAKVPool`` with the SWA token allocator and the
SWA-aware radix cache. Kara compresses the full-attention layers' KV only; the uncompressed
tail (U = 16) covers the sliding window (16 entries). SGLang's strict memory checks, its
invariant checks (``SGLANG_INVARIANT_CHECK=2``: a free of a released SWA peer, or a full slot
freed with a live one, kills the scheduler) and Kara's double-free checks are on. Overlap
scheduling is on (``KARA_TEST_OVERLAP``). Triton attention on Triton's interpreter: slow, so
the generations are short.
"""

import os

import pytest

from support.engines import (assert_pool_back_to_idle, flush, last, make_engine, pool_state, scoped_environ,
                             use_cpu_sglang)
from support.swa_model import ENGINE_ARGS, SLIDING_WINDOW, build_tiny_gpt_oss

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

use_cpu_sglang()

W, U, KEEP = 32, SLIDING_WINDOW, 0.25
KARA = dict(kv_policy="kara", kara_window=W, kara_buffer=U, kara_keep_ratio=KEEP, kara_chunk_size=2)
LONG = 2 * W + U + 6  # two compressions
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19]]
SYSTEM = list(range(40, 80))


def greedy(n, **extra):
    return dict(temperature=0, max_new_tokens=n, ignore_eos=True, **extra)


def expected_eviction(prompt_len: int, completion_tokens: int):
    from kara_sglang import KaraConfig, WindowState, make_policy

    policy = make_policy(KaraConfig(window=W, buffer=U, keep_ratio=KEEP, chunk_size=2))
    state = WindowState(prompt_len=prompt_len)
    for _ in range(completion_tokens - 2):
        state.on_decode()
        task = policy.plan(state)
        if task is not None:
            state.apply(task, policy.tail_consumed(task))
    return state.kv_len + 1, state.evicted


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """A vanilla and a Kara engine on the same model, the results each test needs from vanilla."""
    model = build_tiny_gpt_oss(tmp_path_factory.mktemp("tiny_gpt_oss"))
    with scoped_environ({"SGLANG_INVARIANT_CHECK": "2"}):  # read by the schedulers at start
        vanilla = make_engine(model, **ENGINE_ARGS)
        try:
            kara = make_engine(model, **ENGINE_ARGS, **KARA)
        except Exception:
            vanilla.shutdown()
            raise
    yield vanilla, kara
    kara.shutdown()
    vanilla.shutdown()


def assert_both_sides_idle(engine):
    assert_pool_back_to_idle(engine)
    state = pool_state(engine)
    assert state["swa_available_tokens"] == state["swa_max_total_tokens"], state
    assert state["swa_evictable_tokens"] == 0 and state["swa_protected_tokens"] == 0, state


def test_compression_on_schedule_opt_out_identical_and_both_pools_back(engines):
    vanilla, kara = engines
    base = vanilla.generate(input_ids=PROMPTS, sampling_params=greedy(LONG))
    before = pool_state(kara)
    ours = kara.generate(input_ids=PROMPTS + [PROMPTS[0]],
                         sampling_params=[greedy(LONG), greedy(LONG), greedy(LONG, custom_params={"kv_policy": "none"})])
    for b, o, prompt in zip(base, ours, PROMPTS):
        meta = o["meta_info"]
        kept, evicted = expected_eviction(len(prompt), LONG)
        assert last(meta, "kv_tokens_evicted") == evicted > 0
        assert last(meta, "kv_tokens_kept") == kept
        first = W + U + 1  # nothing compressed before: vanilla's tokens
        assert o["output_ids"][:first] == b["output_ids"][:first]
    assert ours[2]["output_ids"] == base[0]["output_ids"]  # opted out in the same batch
    assert last(ours[2]["meta_info"], "kv_tokens_evicted") == 0
    state = pool_state(kara)
    assert state["compression_events"] - before["compression_events"] == 2 * len(PROMPTS)
    assert state["kv_slots_freed"] - before["kv_slots_freed"] == sum(
        last(o["meta_info"], "kv_tokens_evicted") for o in ours)
    assert_both_sides_idle(kara)
    assert_both_sides_idle(vanilla)


def test_short_requests_are_vanilla(engines):
    vanilla, kara = engines
    n = W + U - 2
    events = pool_state(kara)["compression_events"]
    base = vanilla.generate(input_ids=PROMPTS, sampling_params=greedy(n))
    ours = kara.generate(input_ids=PROMPTS, sampling_params=greedy(n))
    assert [o["output_ids"] for o in ours] == [b["output_ids"] for b in base]
    assert pool_state(kara)["compression_events"] == events
    assert_both_sides_idle(kara)


def test_a_second_turn_reuses_only_exact_kv(engines):
    """The radix tree receives the exact prefix only: a second turn on a compressed reply
    re-prefills the rest, so its output is what vanilla gives for the same prompt."""
    vanilla, kara = engines
    flush(kara)
    first = kara.generate(input_ids=SYSTEM + [11, 12], sampling_params=greedy(LONG))
    assert last(first["meta_info"], "kv_tokens_evicted") > 0
    prompt = SYSTEM + [11, 12] + first["output_ids"] + [21, 22]
    ours = kara.generate(input_ids=prompt, sampling_params=greedy(8))
    flush(vanilla)
    base = vanilla.generate(input_ids=prompt, sampling_params=greedy(8))
    assert ours["output_ids"] == base["output_ids"]
    assert ours["meta_info"]["cached_tokens"] < len(prompt) - U  # the compressed reply was not matched
    print("turn 2 cached tokens:", ours["meta_info"]["cached_tokens"], "of", len(prompt))
    assert_both_sides_idle(kara)
