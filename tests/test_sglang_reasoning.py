"""``--kara-scope reasoning`` through real SGLang: the answer after the thinking is never compressed.

The tiny random model cannot be made to think, so the outputs are teacher-forced (a custom
logit processor, ``benchmarks/fidelity/teacher_forcing.py``) to contain the end-of-thinking
marker of ``--reasoning-parser deepseek-r1`` at a chosen position; the processor records the
KV each request holds at every position (Kara's window state), which is what is checked.
"""

import random
import sys
from pathlib import Path

import pytest

from support.engines import assert_pool_back_to_idle, make_engine, use_cpu_sglang

pytestmark = pytest.mark.sglang

use_cpu_sglang()
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "fidelity"))
from teacher_forcing import ENGINE_ARGS, importable, teacher_forced  # noqa: E402

W, U = 32, 8
THINK, ANSWER = 100, 70  # decode tokens before the marker, and after it


def evictions(records):
    """Positions at which the request's KV shrank (a compression ran before that token)."""
    held = [r for r in records if r["kv"] is not None]  # from the first decode step on
    return [r["pos"] for prev, r in zip(held, held[1:]) if r["kv"] < prev["kv"] + 1]


def test_reasoning_scope_never_compresses_the_answer(tiny_model):
    from transformers import AutoTokenizer

    marker = AutoTokenizer.from_pretrained(tiny_model).encode("</think>", add_special_tokens=False)
    rng = random.Random(11)

    def ids(n):
        return [rng.randrange(10, 500) for _ in range(n)]

    prompt = ids(24)
    thinking = ids(THINK)
    answer = ids(ANSWER)
    importable()
    engine = make_engine(tiny_model, kv_policy="kara", kara_window=W, kara_buffer=U, kara_keep_ratio=0.25,
                         kara_chunk_size=2, reasoning_parser="deepseek-r1", **ENGINE_ARGS)
    try:
        _, (with_marker, no_marker, closed) = teacher_forced(engine, [
            {"input_ids": prompt, "forced": thinking + marker + answer},
            {"input_ids": prompt, "forced": thinking + ids(len(marker)) + answer},
            # a template that disabled thinking: the prompt already ends with the marker
            {"input_ids": prompt + marker + ids(2), "forced": thinking + answer},
        ])
        assert_pool_back_to_idle(engine)
    finally:
        engine.shutdown()

    end = THINK + len(marker)  # first answer position
    # Without a marker the same positions keep compressing, past the end of the thinking...
    assert [p for p in evictions(no_marker) if p > end]
    # ... with it, compression ran while thinking, and never once the answer began: from the
    # marker on, the KV grows by exactly one entry per token.
    assert evictions(with_marker) and max(evictions(with_marker)) < end
    tail = [r["kv"] for r in with_marker if r["pos"] >= end]
    assert tail == list(range(tail[0], tail[0] + len(tail)))
    # Thinking closed by the prompt: nothing of the reply is compressed.
    assert evictions(closed) == []


def test_a_request_retracted_after_its_thinking_stays_uncompressed(tiny_model):
    # SGLang re-prefills a retracted request (its output so far becomes prompt); one that had
    # already emitted the marker must not start compressing its answer afterwards.
    from transformers import AutoTokenizer

    marker = AutoTokenizer.from_pretrained(tiny_model).encode("</think>", add_special_tokens=False)
    rng = random.Random(12)

    def ids(n):
        return [rng.randrange(10, 500) for _ in range(n)]

    importable()
    # A tiny pool and optimistic admission: the answers outgrow it and SGLang retracts.
    engine = make_engine(tiny_model, kv_policy="kara", kara_window=W, kara_buffer=U, kara_keep_ratio=0.25,
                         kara_chunk_size=2, reasoning_parser="deepseek-r1", **ENGINE_ARGS,
                         max_total_tokens=600, schedule_conservativeness=0.02)
    try:
        # Thinking shorter than W + U (never compressed), then a long answer.
        outs, records = teacher_forced(engine, [{"input_ids": ids(24), "forced": ids(4) + marker + ids(150)}
                                                for _ in range(12)])
        assert_pool_back_to_idle(engine)
    finally:
        engine.shutdown()
    assert sum(o["meta_info"]["num_retractions"] for o in outs) > 0  # the pool really ran out
    assert all(evictions(r) == [] for r in records)
