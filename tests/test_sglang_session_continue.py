"""Continuing a streaming session on its compressed KV (issue 19, item 2), through the real scheduler.

A turn with ``custom_params: {"kara_session_continue": true}`` in a streaming session leaves
its compacted row to the session; the next turn's prompt is the conversation in KV space (the
evicted ids left out) and only its new tokens are prefilled.

The reference for what a continued turn must output: one plain request that decodes the
whole conversation. Turn 1 decodes its first ``N1`` tokens (same prompt, same compression
schedule, so the same compacted row); turn 2's new input *is* that request's next two
tokens. From there both attend to the same KV at the same positions, so turn 2 must
reproduce the plain request's tokens until the plain request compresses again (turn 2
treats the whole history as prompt and never touches it). A wrong RoPE offset on the new
tokens, a wrong column, or a re-prefilled reply token shows up as a different token.

Every engine runs SGLang's strict memory checks and Kara's double-free check
(support.engines.TEST_ENV); the pool must add up between turns and be idle after close.
"""

import asyncio

import pytest

from support.engines import (assert_pool_back_to_idle, assert_pool_consistent, flush, last, make_engine, shared_engine,
                             use_cpu_sglang)
from test_sglang_engine import KARA, U, W, greedy
from test_sglang_sessions import PROMPT, STREAMING, rid, wait_for_sessions_released

pytestmark = pytest.mark.sglang

use_cpu_sglang()

CONTINUE = {"kara_session_continue": True}
N1 = W + U + 3  # turn 1 compresses once (after output token W + U + 1), and stops soon after
N2 = W + U + 6  # turn 2 compresses once of its own


def stream_turn(engine, ids, n, session_params, request_id, **extra):
    """One greedy turn, streamed (per-token KV counts), with each output token's logprob."""
    final = None
    for final in engine.generate(input_ids=ids, sampling_params=greedy(n, **extra), session_params=session_params,
                                 rid=request_id, stream=True, return_logprob=True):
        pass
    return final


def logprobs(out) -> list:
    return [entry[0] for entry in out["meta_info"]["output_token_logprobs"]]


def first_change(values, start: int = 0) -> int:
    """Index of the first value past ``start`` that differs from the one before it."""
    for i in range(max(start, 1), len(values)):
        if values[i] != values[i - 1]:
            return i
    return len(values)


def continued_conversation(engine, page: int):
    flush(engine)
    # The plain request the turns must follow: the whole conversation, decoded in one go.
    plain = stream_turn(engine, PROMPT, N1 + 2 + N2, None, rid("plain"))
    plain_ids, plain_evicted = plain["output_ids"], plain["meta_info"]["kv_tokens_evicted"]
    second = first_change(plain_evicted, start=N1)  # the plain request's next compression
    sid = engine.open_session(capacity_of_str_len=1 << 20, streaming=True)

    t1 = stream_turn(engine, PROMPT, N1, {"id": sid}, rid("cont"), custom_params=CONTINUE)
    e1 = t1["meta_info"]["kv_tokens_evicted"][-1]
    assert e1 > 0 and t1["output_ids"] == plain_ids[:N1]
    assert_pool_consistent(engine)

    new2 = plain_ids[N1:N1 + 2]
    t2 = stream_turn(engine, new2, N2, {"id": sid}, rid("cont"), custom_params=CONTINUE)
    meta = t2["meta_info"]
    conversation = len(PROMPT) + N1 + len(new2)
    # The prompt is the conversation in KV space; everything but the last reply token (no
    # KV yet, as in vanilla) and the new tokens comes from the session's row.
    assert meta["prompt_tokens"] == conversation - e1
    assert meta["cached_tokens"] == meta["prompt_tokens"] - 1 - len(new2)
    assert meta["kv_tokens_evicted"][0] == e1 and meta["kv_tokens_evicted"][-1] > e1  # turn 2 compressed too
    same = second - (N1 + 2)
    assert same >= W // 2, (second, same)
    assert t2["output_ids"][:same] == plain_ids[N1 + 2:second], (page, same)
    # Tokens of a tiny random model barely depend on positions; its logprobs do.
    drift = max(abs(a - b) for a, b in zip(logprobs(t2)[:same], logprobs(plain)[N1 + 2:second]))
    # Measured on the CPU: 0 here, 1e-3 with the new tokens' or the decode's RoPE offset left out.
    assert drift < 2e-4, drift
    assert_pool_consistent(engine)

    t3 = stream_turn(engine, [31, 32], 8, {"id": sid}, rid("cont"), custom_params=CONTINUE)
    meta3 = t3["meta_info"]
    e2 = meta["kv_tokens_evicted"][-1]
    assert meta3["prompt_tokens"] == meta["prompt_tokens"] + N2 + 2 - (e2 - e1)
    assert meta3["cached_tokens"] == meta3["prompt_tokens"] - 3
    print(f"\ncontinued session (page {page}): turn 2 prefilled {meta['prompt_tokens'] - meta['cached_tokens']} "
          f"of {conversation} conversation tokens ({e1} evicted), matched the plain request for {same} tokens "
          f"(logprobs within {drift:.1e}); "
          f"turn 3 prefilled {meta3['prompt_tokens'] - meta3['cached_tokens']}")
    assert_pool_consistent(engine)
    engine.close_session(sid)
    wait_for_sessions_released(engine)
    assert_pool_consistent(engine)
    assert_pool_back_to_idle(engine)


@pytest.fixture(scope="module")
def engine_page1(tiny_model):
    engine = make_engine(tiny_model, **STREAMING, **KARA)
    yield engine
    engine.shutdown()


class TestPage1:
    def test_continued_turns_prefill_only_new_tokens_and_follow_the_plain_request(self, engine_page1):
        continued_conversation(engine_page1, page=1)

    def test_turn_without_compression_is_vanilla(self, engine_page1):
        # Nothing evicted: the conversation is the token-space one, and the opt-in changes
        # nothing: the same session turns opted out of the policy are the reference.
        def two_turns(custom):
            flush(engine_page1)
            sid = engine_page1.open_session(capacity_of_str_len=1 << 20, streaming=True)
            t1 = stream_turn(engine_page1, PROMPT, W, {"id": sid}, rid("short"), custom_params=custom)
            t2 = stream_turn(engine_page1, [21, 22], 4, {"id": sid}, rid("short"), custom_params=custom)
            engine_page1.close_session(sid)
            wait_for_sessions_released(engine_page1)
            assert_pool_back_to_idle(engine_page1)
            return [(t["output_ids"], t["meta_info"]["prompt_tokens"], t["meta_info"]["cached_tokens"])
                    for t in (t1, t2)]

        continued = two_turns(CONTINUE)
        assert continued == two_turns({"kv_policy": "none"})
        assert continued[1][1] == len(PROMPT) + W + 2

    def test_refusals_are_per_request_and_leave_the_session_usable(self, engine_page1):
        flush(engine_page1)
        with pytest.raises(ValueError, match="kara_session_continue needs a streaming session"):
            engine_page1.generate(input_ids=PROMPT, sampling_params=greedy(4, custom_params=CONTINUE))
        plain_sid = engine_page1.open_session(capacity_of_str_len=1 << 20)
        with pytest.raises(ValueError, match="kara_session_continue needs a streaming session"):
            engine_page1.generate(input_ids=PROMPT, sampling_params=greedy(4, custom_params=CONTINUE),
                                  session_params={"id": plain_sid})
        engine_page1.close_session(plain_sid)
        with pytest.raises(ValueError, match="must be true or false"):
            engine_page1.generate(input_ids=PROMPT, sampling_params=greedy(4, custom_params={
                "kara_session_continue": "yes"}))

        sid = engine_page1.open_session(capacity_of_str_len=1 << 20, streaming=True)
        t1 = stream_turn(engine_page1, PROMPT, N1, {"id": sid}, rid("refuse"), custom_params=CONTINUE)
        assert t1["meta_info"]["kv_tokens_evicted"][-1] > 0
        # The row is compressed: a turn that would read it as the token-space conversation is refused.
        with pytest.raises(ValueError, match="continues on compressed KV"):
            engine_page1.generate(input_ids=[21, 22], sampling_params=greedy(4), session_params={"id": sid})
        t2 = stream_turn(engine_page1, [21, 22], 4, {"id": sid}, rid("refuse"), custom_params=CONTINUE)
        assert t2["meta_info"]["cached_tokens"] == t2["meta_info"]["prompt_tokens"] - 3
        assert_pool_consistent(engine_page1)
        engine_page1.close_session(sid)
        wait_for_sessions_released(engine_page1)
        assert_pool_back_to_idle(engine_page1)


@pytest.fixture
def engine_page16(tiny_model):
    # The session's shared engine of this configuration (test_sglang_sessions' streaming one),
    # flushed and checked idle for each test.
    return shared_engine(tiny_model, page_size=16, **STREAMING, **KARA)


async def _abort_midway(engine, ids, n, params, request_id):
    """Stream a continued turn and abort it once it has compressed; returns the last chunk or error."""
    gen = await engine.async_generate(input_ids=ids, sampling_params=greedy(n, custom_params=CONTINUE),
                                      session_params=params, rid=request_id, stream=True)
    final = None
    try:
        async for chunk in gen:
            final = chunk
            if len(chunk["output_ids"]) > W + U + 2:
                engine.tokenizer_manager.abort_request(rid=request_id)
                await asyncio.sleep(0)
    except ValueError as err:
        return err
    return final


class TestPage16:
    def test_continued_turns_prefill_only_new_tokens_and_follow_the_plain_request(self, engine_page16):
        continued_conversation(engine_page16, page=16)

    def test_abort_a_continued_turn_then_continue(self, engine_page16):
        flush(engine_page16)
        sid = engine_page16.open_session(capacity_of_str_len=1 << 20, streaming=True)
        t1 = stream_turn(engine_page16, PROMPT, N1, {"id": sid}, rid("abort"), custom_params=CONTINUE)
        r2 = rid("abort")
        out = engine_page16.loop.run_until_complete(_abort_midway(engine_page16, [21, 22], 4 * W, {"id": sid}, r2))
        if not isinstance(out, Exception):
            assert out["meta_info"]["finish_reason"]["type"] == "abort", out["meta_info"]["finish_reason"]
        assert_pool_consistent(engine_page16)
        # The aborted turn never finished: the session continues from turn 1's conversation.
        t3 = stream_turn(engine_page16, [31, 32], 8, {"id": sid}, rid("abort"), custom_params=CONTINUE)
        e1 = t1["meta_info"]["kv_tokens_evicted"][-1]
        assert t3["meta_info"]["prompt_tokens"] == len(PROMPT) + N1 + 2 - e1
        assert t3["meta_info"]["kv_tokens_evicted"][0] == e1
        assert_pool_consistent(engine_page16)
        engine_page16.close_session(sid)
        wait_for_sessions_released(engine_page16)
        assert_pool_back_to_idle(engine_page16)

    def test_close_during_a_continued_turn(self, engine_page16):
        from sglang.srt.managers.io_struct import CloseSessionReqInput

        flush(engine_page16)
        sid = engine_page16.open_session(capacity_of_str_len=1 << 20, streaming=True)
        stream_turn(engine_page16, PROMPT, N1, {"id": sid}, rid("close"), custom_params=CONTINUE)
        tm = engine_page16.tokenizer_manager

        async def run():
            gen = await engine_page16.async_generate(
                input_ids=[21, 22], sampling_params=greedy(N2, custom_params=CONTINUE),
                session_params={"id": sid}, rid=rid("close"), stream=True)
            final, closed = None, False
            async for chunk in gen:
                final = chunk
                if not closed and len(chunk["output_ids"]) > 4:
                    closed = True
                    await tm.close_session(CloseSessionReqInput(session_id=sid), None)
            return final

        out = engine_page16.loop.run_until_complete(run())
        assert out["meta_info"]["finish_reason"]["type"] == "length"
        wait_for_sessions_released(engine_page16)
        assert_pool_consistent(engine_page16)
        assert_pool_back_to_idle(engine_page16)


# ----------------------------------------------------------- many sessions, small pool
# Four continued conversations at once in a 600-token pool with optimistic admission, half of
# their second turns keeping everything. A streaming session's KV stays pinned to it between
# turns (vanilla too), so the sessions' KV must fit the pool: turn 1 leaves about 60 tokens a
# conversation, turn 2 at most about 190. Measured: neither release retracts here (a pool that
# runs dry under continued turns is one their pinned KV nearly fills, and then it stalls as
# vanilla's streaming sessions do), so retraction of a continued turn is not exercised.
SMALL_POOL = dict(max_total_tokens=600, chunked_prefill_size=256, schedule_conservativeness=0.02,
                  max_running_requests=16)  # a row per open session + one per running turn
SMALL_POOL_TURNS = ((90, {}), (120, {"kara_keep_ratio": 1.0}))


async def _continued_conversation(engine, i, prompt):
    from sglang.srt.managers.io_struct import CloseSessionReqInput, OpenSessionReqInput

    tm = engine.tokenizer_manager
    sid = f"small-pool-{i}"
    await tm.open_session(OpenSessionReqInput(capacity_of_str_len=1 << 20, session_id=sid, streaming=True), None)
    turns = []
    for (n, extra), new_ids in zip(SMALL_POOL_TURNS, (prompt, [21, 22])):
        custom = {**CONTINUE, **(extra if i % 2 else {})}
        out = await engine.async_generate(input_ids=new_ids, sampling_params=greedy(n, custom_params=custom),
                                          session_params={"id": sid}, rid=rid(f"small-pool{i}"))
        turns.append(out["meta_info"])
    await tm.close_session(CloseSessionReqInput(session_id=sid), None)
    return turns


@pytest.fixture(scope="module")
def engine_small_pool(tiny_model):
    engine = make_engine(tiny_model, **SMALL_POOL, **STREAMING, **KARA)
    yield engine
    engine.shutdown()


def test_concurrent_continued_sessions_in_a_small_pool(engine_small_pool):
    import random

    engine = engine_small_pool
    flush(engine)
    rng = random.Random(5)
    prompts = [[rng.randrange(10, 500) for _ in range(20)] for _ in range(4)]

    async def run():
        together = asyncio.gather(*(_continued_conversation(engine, i, p) for i, p in enumerate(prompts)))
        return await asyncio.wait_for(together, timeout=240)

    conversations = engine.loop.run_until_complete(run())
    retractions = sum(m["num_retractions"] for turns in conversations for m in turns)
    print(f"\nfour continued sessions in a 600-token pool: {retractions} retractions")
    assert all(m["finish_reason"]["type"] == "length" for turns in conversations for m in turns)
    n1 = SMALL_POOL_TURNS[0][0]
    for turns in conversations:
        evicted = last(turns[0], "kv_tokens_evicted")
        assert evicted > 0
        # The second turn's prompt is the conversation in KV space, all of it but the last
        # reply token and the new tokens from the session's row.
        assert turns[1]["prompt_tokens"] == 20 + n1 + 2 - evicted
        assert turns[1]["cached_tokens"] == turns[1]["prompt_tokens"] - 3
    wait_for_sessions_released(engine)
    assert_pool_consistent(engine)
    assert_pool_back_to_idle(engine)
