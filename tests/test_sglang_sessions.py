"""SGLang sessions through the real scheduler with a KV policy (issue 19, item 1).

Plain sessions (``open_session``; each turn names the request it continues, and the radix
tree supplies the shared KV) and streaming sessions (``--enable-streaming-session``; the
session keeps its request's ``req_to_token`` row between turns, outside the tree). With
Kara a finished turn hands either of them only its exact prefix (``before_release``), so
the next turn re-prefills the compressed part of the reply; item 2 of the issue is about
continuing on the compressed KV instead, and nothing here asserts the re-prefill.

Every engine runs SGLang's strict memory checks (busy and idle) and Kara's double-free
check (support.engines.TEST_ENV): a leak kills the scheduler and fails the test. Between
turns the pool must add up (free + tree + streaming-session slots = pool size), and after
``close_session`` and a flush it must be back to idle.

Engines of a configuration other tests use too are the session's shared ones (support.engines).
"""

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import List, Optional

import pytest

from support.engines import (
    assert_pool_back_to_idle,
    assert_pool_consistent,
    flush,
    make_engine,
    pool_state,
    shared_engine,
    use_cpu_sglang,
)
from test_sglang_engine import KARA, SYSTEM, U, W, greedy

pytestmark = pytest.mark.sglang

use_cpu_sglang()

PROMPT = SYSTEM + [11, 12]
# (new input ids, new tokens): turn 1 compresses twice, turn 2 never reaches W + U decode
# tokens, turn 3 compresses once.
TURNS = ((PROMPT, 2 * W + U + 5), ([21, 22, 23], W + U - 2), ([31, 32], W + U + 6))
SHORT_TURNS = TURNS[:2]  # the per-policy runs: one compressing turn, one that is not
LONG = 2 * W + U + 5
STREAMING = dict(enable_streaming_session=True)
OPT_OUT = {"kv_policy": "none"}
_ids = itertools.count()


@dataclass
class Turn:
    context: List[int]  # the whole prompt the session built for this turn
    output_ids: List[int]
    cached: int
    evicted: Optional[List[int]]  # per output token (Kara only)
    rid: str

    @property
    def first_compressed(self) -> int:
        """Index of the first output token computed on compressed KV (its length if none)."""
        for i, e in enumerate(self.evicted or ()):
            if e > 0:
                return i
        return len(self.output_ids)


def rid(tag: str) -> str:
    # SGLang aborts every request whose rid starts with the one named: end each rid in "-r".
    return f"{tag}-{next(_ids)}-r"


def stream_turn(engine, ids, n, session_params, request_id, **extra):
    """One turn, streamed (per-token KV counts); the final chunk has the whole output."""
    final = None
    for final in engine.generate(input_ids=ids, sampling_params=greedy(n, **extra),
                                 session_params=session_params, rid=request_id, stream=True):
        pass
    return final


def converse(engine, streaming: bool, turns=TURNS, tag="conv"):
    """Open a session and run ``turns`` in it; returns (session id, turns)."""
    sid = engine.open_session(capacity_of_str_len=1 << 20, streaming=streaming)
    done: List[Turn] = []
    prev = None
    for new_ids, n in turns:
        context = (done[-1].context + done[-1].output_ids if done else []) + list(new_ids)
        # A plain session appends to the request it names; a streaming one to its last.
        params = {"id": sid} if streaming or prev is None else {"id": sid, "rid": prev}
        prev = rid(tag)
        out = stream_turn(engine, new_ids, n, params, prev)
        meta = out["meta_info"]
        assert meta["finish_reason"]["type"] == "length", meta["finish_reason"]
        assert meta["prompt_tokens"] == len(context) and meta["completion_tokens"] == n
        done.append(Turn(context, out["output_ids"], meta["cached_tokens"], meta.get("kv_tokens_evicted"), prev))
        assert_pool_consistent(engine)  # idle between turns: the session's slot is counted
    return sid, done


def close_and_check_idle(engine, sid) -> None:
    engine.close_session(sid)
    wait_for_sessions_released(engine)
    assert_pool_consistent(engine)
    assert_pool_back_to_idle(engine)


def wait_for_sessions_released(engine, timeout: float = 10.0) -> None:
    """A streaming session closed while its turn ran is released by SGLang's reaper (1 s)."""
    deadline = time.monotonic() + timeout
    while pool_state(engine).get("session_held_tokens", 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert pool_state(engine).get("session_held_tokens", 0) == 0


def vanilla_rule(prev: Turn) -> int:
    """Vanilla's cache hit for the turn after ``prev``: its prompt and every reply token but
    the last (whose KV is never computed)."""
    return len(prev.context) + len(prev.output_ids) - 1


def reference(engine, turn: Turn, vanilla_turn: Turn) -> List[int]:
    """Vanilla's output for this turn's context: the vanilla engine's, or, where an earlier
    compressed turn already changed the conversation, the same engine's with the policy
    opted out (untouched KV: vanilla's output, tests/test_sglang_engine.py)."""
    if turn.context == vanilla_turn.context:
        return vanilla_turn.output_ids
    out = engine.generate(input_ids=turn.context,
                          sampling_params=greedy(len(turn.output_ids), custom_params=OPT_OUT))
    return out["output_ids"]


def check_against_vanilla(engine, turns: List[Turn], base: List[Turn], label: str, page_size: int = 1,
                          streaming: bool = False) -> List[int]:
    """Outputs identical to vanilla until each turn's first compression (outright for turns
    that never compress); the next turn's cache hit keeps the previous prompt. Returns the
    per-turn first-compressed indices."""
    firsts = []
    for k, (turn, vanilla_turn) in enumerate(zip(turns, base)):
        j = turn.first_compressed
        ref = reference(engine, turn, vanilla_turn)
        assert turn.output_ids[:j] == ref[:j], (label, k, j)
        firsts.append(j)
        if k == 0:
            continue
        prev = turns[k - 1]
        # Prefix reuse of the previous prompt stays intact; the radix tree matches whole
        # pages, a streaming session's own row any length.
        floor = len(prev.context) if streaming else len(prev.context) // page_size * page_size
        assert turn.cached >= floor, (label, k, turn.cached, floor)
        assert turn.cached <= vanilla_rule(prev), (label, k)
        if prev.first_compressed == len(prev.output_ids) and page_size == 1:
            assert turn.cached == vanilla_rule(prev), (label, k)  # nothing compressed: all exact
    print(f"\n{label}: cached tokens per turn (vanilla / policy): "
          + ", ".join(f"turn {k + 1}: {b.cached} / {t.cached} of {len(t.context)}"
                      for k, (t, b) in enumerate(zip(turns, base)))
          + f"; first compressed output token per turn: {firsts}")
    return firsts

# ----------------------------------------------------- close mid-turn, abort a turn


def session_params(sid, streaming, prev_rid):
    return {"id": sid} if streaming else {"id": sid, "rid": prev_rid}


async def _stream_and_act_midway(engine, ids, n, params, request_id, act):
    """Stream a turn and call ``act`` once its first compression has run (tokens past
    W + U + 1); returns the last chunk, or the ValueError an aborted request raises."""
    gen = await engine.async_generate(input_ids=ids, sampling_params=greedy(n), session_params=params,
                                      rid=request_id, stream=True)
    final, acted = None, False
    try:
        async for chunk in gen:
            final = chunk
            if not acted and len(chunk["output_ids"]) > W + U + 2:
                acted = True
                await act()
    except ValueError as err:
        return err
    assert acted
    return final


def close_mid_turn_and_abort(engine, streaming: bool, label: str):
    from sglang.srt.managers.io_struct import CloseSessionReqInput

    flush(engine)
    tm = engine.tokenizer_manager
    base_turns = (PROMPT, LONG), ([21, 22, 23], LONG)

    # 1. close_session while a compressing turn runs: the turn still finishes (a streaming
    #    session defers the release to SGLang's reaper), later turns are refused.
    sid, (t1,) = converse(engine, streaming, turns=base_turns[:1], tag=label)
    r2 = rid(label)
    close = lambda: tm.close_session(CloseSessionReqInput(session_id=sid), None)  # noqa: E731
    out = engine.loop.run_until_complete(_stream_and_act_midway(
        engine, [21, 22, 23], LONG, session_params(sid, streaming, t1.rid), r2, close))
    assert not isinstance(out, Exception), out
    assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert out["meta_info"]["kv_tokens_evicted"][-1] > 0
    with pytest.raises(ValueError, match="session"):
        engine.generate(input_ids=[31, 32], sampling_params=greedy(4),
                        session_params=session_params(sid, streaming, r2))
    wait_for_sessions_released(engine)
    assert_pool_consistent(engine)
    assert_pool_back_to_idle(engine)

    # 2. abort a compressing turn midway, then continue the session from its last finished
    #    turn: the aborted turn leaves nothing behind, the next one is vanilla's.
    sid, (t1,) = converse(engine, streaming, turns=base_turns[:1], tag=label)
    r2 = rid(label)
    out = engine.loop.run_until_complete(_stream_and_act_midway(
        engine, [21, 22, 23], LONG, session_params(sid, streaming, t1.rid), r2,
        lambda: _abort(tm, r2)))
    if not isinstance(out, Exception):
        assert out["meta_info"]["finish_reason"]["type"] == "abort", out["meta_info"]["finish_reason"]
    assert_pool_consistent(engine)
    r3 = rid(label)
    t3 = stream_turn(engine, [31, 32], W + U - 2, session_params(sid, streaming, t1.rid), r3)
    context = t1.context + t1.output_ids + [31, 32]
    meta = t3["meta_info"]
    assert meta["prompt_tokens"] == len(context)
    ref = engine.generate(input_ids=context, sampling_params=greedy(W + U - 2, custom_params=OPT_OUT))
    assert t3["output_ids"] == ref["output_ids"]
    print(f"\n{label}: after an aborted turn the next one hit {meta['cached_tokens']} of {len(context)} "
          f"(turn 1 prompt {len(t1.context)})")
    page = engine.server_args.page_size or 1  # None: SGLang's default (0.5.23 leaves it unresolved here)
    assert meta["cached_tokens"] >= len(t1.context) // page * page
    close_and_check_idle(engine, sid)


async def _abort(tm, request_id):
    tm.abort_request(rid=request_id)


# -------------------------------------------------------------------- retraction


async def _two_turn_conversation(engine, i, prompt):
    from sglang.srt.managers.io_struct import CloseSessionReqInput, OpenSessionReqInput

    tm = engine.tokenizer_manager
    sid = await tm.open_session(OpenSessionReqInput(capacity_of_str_len=1 << 20, session_id=f"retract-{i}"), None)
    # Half the conversations keep everything (keep ratio 1): the pool runs dry.
    custom = {"kara_keep_ratio": 1.0} if i % 2 else {}
    r1 = rid(f"retract{i}")
    first = await engine.async_generate(input_ids=prompt, sampling_params=greedy(150, custom_params=custom),
                                        session_params={"id": sid}, rid=r1)
    second = await engine.async_generate(input_ids=[21, 22], sampling_params=greedy(W + U - 2),
                                         session_params={"id": sid, "rid": r1}, rid=rid(f"retract{i}"))
    await tm.close_session(CloseSessionReqInput(session_id=sid), None)
    return first, second


# --------------------------------------------------------------------------- vanilla


@pytest.fixture(scope="module")
def vanilla(tiny_model):
    """Vanilla SGLang's conversations, both session kinds (computed first, engine shut down)."""
    engine = make_engine(tiny_model, **STREAMING)
    try:
        results = {}
        for streaming in (False, True):
            flush(engine)
            sid, turns = converse(engine, streaming, tag="vanilla")
            close_and_check_idle(engine, sid)
            results[streaming] = turns
        for turns in results.values():
            # Vanilla keeps the whole conversation: each turn hits all of the previous one.
            assert [t.cached for t in turns[1:]] == [vanilla_rule(p) for p in turns[:-1]]
        same = [(t.context, t.output_ids, t.cached) for t in results[False]]
        assert same == [(t.context, t.output_ids, t.cached) for t in results[True]]  # same KV either way
        return results
    finally:
        engine.shutdown()


# ------------------------------------------------------------- Kara, plain sessions
# One engine per class (torn down with it).

# A 600-token pool with optimistic admission: one conversation fits, ten at once make
# SGLang retract (test_plain_sessions_survive_retraction_under_a_small_pool).
SMALL_POOL = dict(max_total_tokens=600, chunked_prefill_size=256, schedule_conservativeness=0.02)


@pytest.fixture(scope="class")
def kara_plain(tiny_model, vanilla):
    engine = make_engine(tiny_model, **SMALL_POOL, **KARA)
    yield engine
    engine.shutdown()


class TestPlainSessions:
    def test_turns_match_vanilla_until_compression_and_nothing_leaks(self, vanilla, kara_plain):
        flush(kara_plain)
        sid, turns = converse(kara_plain, streaming=False, tag="plain")
        firsts = check_against_vanilla(kara_plain, turns, vanilla[False], "kara plain session")
        # Turn 1 compresses on schedule (after output token W + U + 1), turn 2 never, turn 3 does.
        assert firsts == [W + U + 1, len(turns[1].output_ids), W + U + 1]
        close_and_check_idle(kara_plain, sid)

    def test_close_mid_turn_and_abort(self, kara_plain):
        close_mid_turn_and_abort(kara_plain, streaming=False, label="plain-close")

    def test_plain_sessions_survive_retraction_under_a_small_pool(self, kara_plain):
        import random

        flush(kara_plain)
        rng = random.Random(3)
        prompts = [[rng.randrange(10, 500) for _ in range(20)] for _ in range(10)]

        async def run():
            return await asyncio.gather(*(_two_turn_conversation(kara_plain, i, p) for i, p in enumerate(prompts)))

        results = kara_plain.loop.run_until_complete(run())
        metas = [(a["meta_info"], b["meta_info"]) for a, b in results]
        assert all(m["finish_reason"]["type"] == "length" for pair in metas for m in pair)
        retractions = sum(m["num_retractions"] for pair in metas for m in pair)
        print(f"\nplain sessions under a 600-token pool: {retractions} retractions")
        import sglang

        if retractions == 0 and sglang.__version__ != "0.5.17":
            # As in test_sglang_stress: 0.5.23's admission never runs this pool dry.
            pytest.skip(f"SGLang {sglang.__version__} never ran this pool dry, so nothing was retracted")
        assert retractions > 0  # the pool really ran out
        assert sum(a["kv_tokens_evicted"][-1] for a, _ in metas) > 0
        for (first, second), prompt in zip(results, prompts):
            # The second turn is built from the first's whole reply, and its output is vanilla's
            # for that context (the policy opted out, on the same engine).
            context = prompt + first["output_ids"] + [21, 22]
            assert second["meta_info"]["prompt_tokens"] == len(context)
        ref = kara_plain.generate(input_ids=prompts[0] + results[0][0]["output_ids"] + [21, 22],
                                  sampling_params=greedy(W + U - 2, custom_params=OPT_OUT))
        assert results[0][1]["output_ids"] == ref["output_ids"]
        assert_pool_consistent(kara_plain)
        assert_pool_back_to_idle(kara_plain)


# --------------------------------------------------------- Kara, streaming sessions


@pytest.fixture
def kara_streaming(tiny_model, vanilla):
    # Page size 16: the session's row is cut at its exact prefix inside a partly used page.
    # The session's shared engine of this configuration (test_sglang_session_continue's too).
    return shared_engine(tiny_model, page_size=16, **STREAMING, **KARA)


class TestStreamingSessions:
    def test_turns_match_vanilla_until_compression_and_nothing_leaks(self, vanilla, kara_streaming):
        flush(kara_streaming)
        sid, turns = converse(kara_streaming, streaming=True, tag="streaming")
        firsts = check_against_vanilla(kara_streaming, turns, vanilla[True], "kara streaming session (page 16)",
                                       page_size=16, streaming=True)
        assert firsts == [W + U + 1, len(turns[1].output_ids), W + U + 1]
        # While open, the session holds its row (the exact prefix of turn 3 only) outside the tree.
        assert pool_state(kara_streaming)["session_held_tokens"] > 0
        close_and_check_idle(kara_streaming, sid)

    def test_close_mid_turn_and_abort(self, kara_streaming):
        close_mid_turn_and_abort(kara_streaming, streaming=True, label="streaming-close")


# ------------------------------------------------------------------ every policy

POLICIES = {
    "cask": dict(kv_policy="cask", kara_window=W, kara_buffer=U, kara_keep_ratio=0.25, kara_core_fraction=0.5,
                 page_size=16),
    "longflow": dict(kv_policy="longflow", kara_budget=24, kara_buffer=8, kara_num_vote_layers=2),
    "threshold": dict(kv_policy="threshold", kara_budget=24, kara_buffer=8, page_size=16),
    "streaming": dict(kv_policy="streaming", kara_budget=24, kara_buffer=8, kara_sink=4),
}


# On the oldest release CI runs one of them: cask (paged, merging scratch into kept runs); the
# others take the same adapter path as Kara's session suites above.
@pytest.mark.parametrize("name", [name if name == "cask" else pytest.param(name, marks=pytest.mark.newest_release)
                                  for name in POLICIES])
def test_every_policy_through_compressing_session_turns(tiny_model, vanilla, name):
    args = POLICIES[name]
    engine = make_engine(tiny_model, **STREAMING, **args)
    try:
        page = args.get("page_size", 1)
        for streaming in (False, True):
            flush(engine)
            sid, turns = converse(engine, streaming, turns=SHORT_TURNS, tag=f"{name}-{streaming}")
            firsts = check_against_vanilla(engine, turns, vanilla[streaming][:2],
                                           f"{name} {'streaming' if streaming else 'plain'} session (page {page})",
                                           page_size=page, streaming=streaming)
            assert firsts[0] < len(turns[0].output_ids)  # turn 1 compressed
            close_and_check_idle(engine, sid)
    finally:
        engine.shutdown()
