"""``--kv-policy kara`` on a hybrid sliding-window model through real SGLang (CPU engine).

A tiny random-weight gpt-oss (``support.swa_model``): sliding-window and full-attention layers
alternate, so SGLang keeps its KV in an ``SWAKVPool`` with the SWA token allocator and the
SWA-aware radix cache. Kara compresses the full-attention layers' KV only; the uncompressed
tail (U = 4) covers the sliding window (SGLang's 3 + the step's own entry), and SGLang's own
window eviction runs every step (``SGLANG_SWA_EVICTION_INTERVAL=1``; its default of 128 would
never fire on requests this short). SGLang's strict memory checks, its invariant checks
(``SGLANG_INVARIANT_CHECK=2``: a free of a released SWA peer, or a full slot freed with a live
one, kills the scheduler) and Kara's debug checks are on (no slot freed twice; after each
compaction the request's SWA cursor is out of the window and splits its row into entries
without and with an SWA peer: ``swa_window.check_row``). Overlap scheduling is on
(``KARA_TEST_OVERLAP``). Triton attention on Triton's interpreter: one engine of each kind for
the module, one batch each, short generations. On a GPU (``KARA_TEST_DEVICE=cuda``,
``benchmarks/gpu/run_arch_suite.sh``) the engines take the suite's GPU settings
(``support.engines``; ``KARA_TEST_ATTENTION_BACKEND=default``: SGLang's choice, FlashAttention-3
on Hopper) and the model ``KARA_TEST_HEAD_DIM`` (64 there).
"""

import os

import pytest

from support.engines import flush, last, make_engine, pool_state, scoped_environ, use_cpu_sglang
from support.swa_model import ENGINE_ARGS, SLIDING_WINDOW, build_tiny_gpt_oss

pytestmark = pytest.mark.sglang

use_cpu_sglang()

W, U, KEEP = 8, SLIDING_WINDOW, 0.5
KARA = dict(kv_policy="kara", kara_window=W, kara_buffer=U, kara_keep_ratio=KEEP, kara_chunk_size=2)
LONG = 2 * W + U + 6  # two compressions
SHORT = W + U - 2  # none
TURN2 = 4
P0, P1 = [5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19]
# Read by the schedulers at start: strict invariants; SGLang's window eviction every step.
SCHEDULER_ENV = {"SGLANG_INVARIANT_CHECK": "2", "SGLANG_SWA_EVICTION_INTERVAL": "1"}


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


def flushed_state(engine) -> dict:
    flush(engine)
    return pool_state(engine)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both engines' requests, run once for every test here: on Kara, one batch (two long
    requests, an opted-out and a short one) and a second turn on a compressed reply; then on
    vanilla the same prompts in one batch. The pool accounting is read around them."""
    from kara_sglang import swa_window

    if swa_window.missing():  # Kara refuses the model at start-up there (kv_pool._check_swa)
        pytest.skip(f"this SGLang lacks the {swa_window.missing()}")
    model = build_tiny_gpt_oss(tmp_path_factory.mktemp("tiny_gpt_oss"),
                               head_dim=int(os.environ.get("KARA_TEST_HEAD_DIM", "32")))
    with scoped_environ(SCHEDULER_ENV):
        vanilla = make_engine(model, **ENGINE_ARGS)
        try:
            kara = make_engine(model, **ENGINE_ARGS, **KARA)
        except Exception:
            vanilla.shutdown()
            raise
    try:
        before = pool_state(kara)
        ours = kara.generate(input_ids=[P0, P1, P0, P0], sampling_params=[
            greedy(LONG), greedy(LONG), greedy(LONG, custom_params={"kv_policy": "none"}), greedy(SHORT)])
        held = pool_state(kara)  # idle, the finished requests' prefixes in the tree
        turn2_prompt = P1 + ours[1]["output_ids"] + [21, 22]
        turn2 = kara.generate(input_ids=turn2_prompt, sampling_params=greedy(TURN2))
        after = flushed_state(kara)
        base = vanilla.generate(input_ids=[P0, P1, turn2_prompt],
                                sampling_params=[greedy(LONG), greedy(LONG), greedy(TURN2)])
        yield dict(ours=ours, base=base, turn2=turn2, turn2_prompt=turn2_prompt, before=before, held=held,
                   after=after, vanilla_after=flushed_state(vanilla))
    finally:
        kara.shutdown()
        vanilla.shutdown()


def test_kara_compresses_on_schedule(runs):
    ours, before, after = runs["ours"], runs["before"], runs["after"]
    for out, prompt in zip(ours[:2], (P0, P1)):
        kept, evicted = expected_eviction(len(prompt), LONG)
        assert last(out["meta_info"], "kv_tokens_evicted") == evicted > 0
        assert last(out["meta_info"], "kv_tokens_kept") == kept
    for out in ours[2:] + [runs["turn2"]]:  # opted out, short, a short second turn
        assert last(out["meta_info"], "kv_tokens_evicted") == 0
    evicted = sum(last(o["meta_info"], "kv_tokens_evicted") for o in ours)
    assert after["compression_events"] - before["compression_events"] == 2 * 2
    assert after["tokens_evicted"] - before["tokens_evicted"] == evicted
    # Only full-attention slots are freed by Kara: one per evicted token.
    assert after["kv_slots_freed"] - before["kv_slots_freed"] == evicted


def test_sglang_evicts_the_sliding_window_itself(runs):
    """SGLang's window eviction, on the compacted rows, had released every SWA peer of the
    compressed regions before Kara compressed them (they are older than the tail, which covers
    the window); the tree then holds SWA KV for a window of each finished request only."""
    held, after = runs["held"], runs["after"]
    assert after["swa_peers_released"] == 0
    assert held["swa_evictable_tokens"] < held["evictable_tokens"], held


def test_opted_out_and_short_requests_and_the_prefix_before_compression_are_vanilla(runs):
    ours, base = runs["ours"], runs["base"]
    for out, ref in zip(ours[:2], base[:2]):
        first = W + U + 1  # nothing compressed before: vanilla's tokens
        assert out["output_ids"][:first] == ref["output_ids"][:first]
    assert ours[2]["output_ids"] == base[0]["output_ids"]  # opted out, in the same batch
    assert ours[3]["output_ids"] == base[0]["output_ids"][:SHORT]  # short (greedy: vanilla's prefix)


def test_a_second_turn_reuses_only_exact_kv(runs):
    """The radix tree receives the exact prefix only: a second turn on a compressed reply
    re-prefills the rest, so its output is what vanilla gives for the same prompt."""
    turn2, prompt = runs["turn2"], runs["turn2_prompt"]
    assert turn2["output_ids"] == runs["base"][2]["output_ids"]
    assert turn2["meta_info"]["cached_tokens"] < len(prompt) - U  # the compressed reply was not matched


@pytest.mark.parametrize("when", ["held", "after", "vanilla_after"])
def test_both_pools_account_for_every_slot_and_go_back_to_idle(runs, when):
    """``held``: idle with the finished requests in the tree (every slot free or tree-owned,
    on each side); ``after``/``vanilla_after``: tree flushed, every slot of both pools free."""
    state = runs[when]
    assert state["available_tokens"] + state["evictable_tokens"] + state["protected_tokens"] \
        == state["max_total_tokens"], state
    assert state["swa_available_tokens"] + state["swa_evictable_tokens"] + state["swa_protected_tokens"] \
        == state["swa_max_total_tokens"], state
    if when != "held":
        assert state["available_tokens"] == state["max_total_tokens"], state
        assert state["swa_available_tokens"] == state["swa_max_total_tokens"], state
        assert state["evictable_tokens"] == state["swa_evictable_tokens"] == 0, state
    else:
        assert state["evictable_tokens"] > 0 and state["protected_tokens"] == 0, state
