"""``--kv-policy`` through real SGLang (CPU engine, torch_native attention, tiny model).

Every engine runs with SGLang's strict memory checks on (busy and idle) and Kara's
double-free check, so a leak or a double free kills the scheduler and fails the test.
"""

import random

import pytest

from support.engines import (
    assert_pool_back_to_idle,
    assert_pool_consistent,
    flush,
    last,
    pool_state,
    shared_engine,
    use_cpu_sglang,
)

pytestmark = pytest.mark.sglang

use_cpu_sglang()

W, U, KEEP = 32, 8, 0.25
BUDGET = int(W * KEEP)
KARA = dict(kv_policy="kara", kara_window=W, kara_buffer=U, kara_keep_ratio=KEEP, kara_chunk_size=2)

PROMPTS = ["the first step is", "one two three four five six", "water long little very after",
           "answer equals seven plus two minus", "they were called people"]


def greedy(n, **extra):
    return dict(temperature=0, max_new_tokens=n, ignore_eos=True, **extra)


def expected_eviction(prompt_len: int, completion_tokens: int):
    """(kept, evicted) KV tokens of a finished request, from Kara's own bookkeeping."""
    from kara_sglang import KaraConfig, WindowState, make_policy

    policy = make_policy(KaraConfig(window=W, buffer=U, keep_ratio=KEEP, chunk_size=2))
    state = WindowState(prompt_len=prompt_len)
    # Compression runs after each decode step; the step that produced the last token wrote
    # the KV of the one before it.
    for _ in range(completion_tokens - 2):
        state.on_decode()
        task = policy.plan(state)
        if task is not None:
            state.apply(task, policy.tail_consumed(task))
    return state.kv_len + 1, state.evicted


SHORT = W + U - 2  # never reaches W + U decode tokens
LONG = 3 * W + U + 5
OPT_OUT = 2 * W + U + 3
SYSTEM = [random.Random(7).randrange(10, 500) for _ in range(48)]


def run_conversation(engine):
    """Shared system prompt, two requests on it, then a second turn of the first one."""
    flush(engine)
    first = engine.generate(input_ids=SYSTEM + [11, 12], sampling_params=greedy(3 * W))
    shared = engine.generate(input_ids=SYSTEM + [13, 14, 15], sampling_params=greedy(10))
    turn2_prompt = SYSTEM + [11, 12] + first["output_ids"] + [21, 22]
    turn2 = engine.generate(input_ids=turn2_prompt, sampling_params=greedy(10))
    return (shared["meta_info"]["cached_tokens"], turn2["meta_info"]["cached_tokens"], turn2["output_ids"],
            turn2_prompt)


@pytest.fixture(scope="module")
def vanilla(tiny_model):
    """Vanilla SGLang's results (a session's shared engine of SGLang's defaults)."""
    engine = shared_engine(tiny_model)
    return {
        "short": engine.generate(PROMPTS, greedy(SHORT)),
        "long": engine.generate(PROMPTS, greedy(LONG)),
        "opt_out": engine.generate(PROMPTS[0], greedy(OPT_OUT)),
        "conversation": run_conversation(engine),
        "engine": engine,  # for references computed in a test (it flushes the tree first)
    }


@pytest.fixture
def kara(tiny_model, vanilla):
    return shared_engine(tiny_model, **KARA)  # flushed and checked idle for each test


def test_short_generations_are_token_identical_to_vanilla(vanilla, kara):
    base = vanilla["short"]
    events = pool_state(kara)["compression_events"]  # the shared engine's count so far
    ours = kara.generate(PROMPTS, greedy(SHORT))
    for b, o in zip(base, ours):
        assert o["output_ids"] == b["output_ids"]
        assert last(o["meta_info"], "kv_tokens_evicted") == 0
    assert pool_state(kara)["compression_events"] == events


def test_compression_fires_on_schedule_and_matches_vanilla_until_then(vanilla, kara):
    n = LONG
    base = vanilla["long"]
    before = pool_state(kara)  # the shared engine's counters so far
    ours = kara.generate(PROMPTS, greedy(n))
    for b, o in zip(base, ours):
        meta = o["meta_info"]
        assert meta["completion_tokens"] == n
        kept, evicted = expected_eviction(meta["prompt_tokens"], n)
        assert last(meta, "kv_tokens_evicted") == evicted > 0
        assert last(meta, "kv_tokens_kept") == kept
        # The first compression runs after the step that wrote decode KV entry W + U, which
        # produced output token W + U + 1: everything up to it is vanilla's.
        first = W + U + 1
        assert o["output_ids"][:first] == b["output_ids"][:first]
    state = assert_pool_consistent(kara)
    assert state["compression_events"] - before["compression_events"] >= len(PROMPTS) * 3
    # The overhead meter saw every decode step, and compressions are part of the hook's time.
    assert state["decode_steps"] - before["decode_steps"] >= n - 1
    assert 0 < state["compress_s"] - before["compress_s"] <= state["hook_host_s"] - before["hook_host_s"]
    assert_pool_back_to_idle(kara)


def test_per_request_opt_out_and_keep_ratio(vanilla, kara):
    n = OPT_OUT
    opt_out, half = kara.generate(
        [PROMPTS[0], PROMPTS[0]],
        [greedy(n, custom_params={"kv_policy": "none"}), greedy(n, custom_params={"kara_keep_ratio": 0.5})],
    )
    assert opt_out["output_ids"] == vanilla["opt_out"]["output_ids"]  # untouched KV: vanilla output
    assert last(opt_out["meta_info"], "kv_tokens_evicted") == 0
    windows = 2  # decode KV reaches W + U, then 2W + U
    assert last(half["meta_info"], "kv_tokens_evicted") == windows * (W - W // 2)
    assert_pool_back_to_idle(kara)


def test_streamed_kv_counts_cover_every_token_and_match_the_final_answer(kara):
    n = LONG
    whole = kara.generate(PROMPTS[2], greedy(n))
    chunks = list(kara.generate(PROMPTS[2], greedy(n), stream=True))
    final = chunks[-1]
    assert final["output_ids"] == whole["output_ids"]
    for key in ("kv_tokens_kept", "kv_tokens_evicted"):
        # One value per output token, streamed or not, and the same final count.
        assert len(final["meta_info"][key]) == len(whole["meta_info"][key]) == n
        assert final["meta_info"][key][-1] == whole["meta_info"][key][-1]
    evicted = final["meta_info"]["kv_tokens_evicted"]
    # Streamed, the values are per token: nothing evicted before the first compression.
    assert evicted[0] == 0 and evicted == sorted(evicted) and evicted[-1] > 0
    assert_pool_consistent(kara)


@pytest.mark.parametrize("params, fragment", [
    ({"kara_keep_ratio": 5}, "kara-keep-ratio"),
    ({"kara_keep_ratio": "lots"}, "kara_keep_ratio"),
    ({"kara_window": 64}, "kara_window"),
    ({"kv_policy": "streaming"}, "kv_policy"),
    ({"kara_chunk_size": 0}, "kara-chunk-size"),
    ("kara_keep_ratio=0.5", "must be an object"),  # not a JSON object: it killed the scheduler
])
def test_bad_per_request_values_get_a_clean_error_and_the_server_keeps_serving(kara, params, fragment):
    # The engine raises the request's abort message; nothing else is affected.
    with pytest.raises(ValueError, match="kara-sglang: invalid custom_params") as err:
        kara.generate(PROMPTS[1], greedy(20, custom_params=params))
    assert fragment in str(err.value) and "\n" not in str(err.value)
    good = kara.generate(PROMPTS[1], greedy(20))
    assert good["meta_info"]["finish_reason"]["type"] == "length"
    assert_pool_consistent(kara)


@pytest.mark.parametrize("bad_id", [10 ** 9, -3])
def test_input_ids_outside_the_vocabulary_get_a_clean_error_and_the_server_keeps_serving(kara, bad_id):
    # Unchecked, SGLang's embedding lookup raises in the scheduler and the server dies.
    with pytest.raises(ValueError, match="outside the model's vocabulary") as err:
        kara.generate(input_ids=[5, bad_id, 7], sampling_params=greedy(5))
    assert str(bad_id) in str(err.value) and "\n" not in str(err.value)
    good = kara.generate(PROMPTS[1], greedy(20))
    assert good["meta_info"]["finish_reason"]["type"] == "length"
    assert_pool_consistent(kara)


def test_an_empty_prompt_gets_a_clean_error_and_the_server_keeps_serving(kara):
    # Unchecked, the empty prefill's reshape raises in the scheduler and the server dies
    # (SGLang 0.5.23; 0.5.17 refuses empty text itself).
    with pytest.raises(ValueError, match="no tokens|texts cannot be empty"):
        kara.generate("", greedy(5))  # a tokenizer without a BOS: no token (input_ids=[] SGLang refuses)
    assert kara.generate(PROMPTS[1], greedy(20))["meta_info"]["finish_reason"]["type"] == "length"
    assert_pool_consistent(kara)


def test_shared_prefix_and_multi_turn_keep_their_cached_tokens(vanilla, kara):
    shared, turn2, turn2_ids, turn2_prompt = run_conversation(kara)
    base_shared, base_turn2, _, _ = vanilla["conversation"]
    # A second request on the same system prompt hits it exactly as on vanilla.
    assert shared == base_shared >= len(SYSTEM)
    # Only the exact prefix of the compressed answer is in the tree (prompt + leading tokens
    # its first window kept in place); the next turn hits it and re-prefills the rest, so
    # its KV is exact again and its (uncompressed) output is vanilla's, token for token.
    assert len(SYSTEM) + 2 <= turn2 < base_turn2
    # Vanilla on the same second-turn prompt (it holds Kara's first answer, which may differ
    # from vanilla's own after the first compression).
    reference = vanilla["engine"].generate(input_ids=turn2_prompt, sampling_params=greedy(10))
    assert turn2_ids == reference["output_ids"]
    assert_pool_back_to_idle(kara)
