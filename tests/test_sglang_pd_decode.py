"""Kara on a PD decode server (``--disaggregation-mode decode``), through real SGLang.

The prefill half is SGLang's ``fake`` transfer backend plus a test plugin that writes
deterministic prompt KV into the slots the decode server pre-allocates
(``support/fake_prefill``), so outputs depend only on the prompt. What is checked: a decode
server with Kara matches a vanilla decode server until the first compression and compresses
on schedule; and a request retracted under memory pressure (SGLang offloads its KV to the
host and copies it back later) resumes with its compressed KV and its Kara state, giving the
same tokens and the same evictions as without the retraction. SGLang's strict per-step leak
checks and Kara's debug checks are on throughout.
"""

import os
import random
from pathlib import Path

import pytest

from support.engines import assert_pool_back_to_idle, last, make_engine, pool_state, use_cpu_sglang
from test_sglang_engine import KARA, LONG, SHORT, U, W, expected_eviction, greedy

pytestmark = pytest.mark.sglang

use_cpu_sglang()

FAKE_PREFILL = str(Path(__file__).parent / "support" / "fake_prefill")
DECODE = dict(disaggregation_mode="decode", disaggregation_transfer_backend="fake")
PROMPTS = [[random.Random(i).randrange(10, 500) for _ in range(12 + 3 * i)] for i in range(8)]


@pytest.fixture(scope="module", autouse=True)
def fake_prefill_plugin():
    """Spawned schedulers load the fake-prefill plugin from PYTHONPATH (restored after)."""
    before = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([FAKE_PREFILL] + [p for p in before.split(os.pathsep) if p])
    yield
    os.environ["PYTHONPATH"] = before


def generate(engine, prompts, n):
    """Requests as a PD router would send them, bootstrap fields naming the fake prefill."""
    k = len(prompts)
    return engine.generate(input_ids=prompts, sampling_params=greedy(n), bootstrap_host=["2.2.2.2"] * k,
                           bootstrap_port=[0] * k, bootstrap_room=list(range(1, k + 1)))


@pytest.fixture(scope="module")
def vanilla():
    engine = make_engine(_model(), **DECODE)
    try:
        yield {"short": generate(engine, PROMPTS, SHORT), "long": generate(engine, PROMPTS, LONG)}
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def kara():
    engine = make_engine(_model(), **DECODE, **KARA)
    yield engine
    engine.shutdown()


def _model():
    from kara_sglang.demo_model import build_tiny_model

    return build_tiny_model(Path(os.environ.get("KARA_TINY_MODEL_DIR", "/tmp/kara-tiny-model-pd")))


def test_short_generations_on_a_decode_server_are_vanilla(vanilla, kara):
    outs = generate(kara, PROMPTS, SHORT)
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in vanilla["short"]]
    assert all(last(o["meta_info"], "kv_tokens_evicted") == 0 for o in outs)
    assert_pool_back_to_idle(kara)


def test_a_decode_server_compresses_on_schedule_and_matches_vanilla_until_then(vanilla, kara):
    outs = generate(kara, PROMPTS, LONG)
    first = W + U + 1  # see test_sglang_engine: the first compression follows this token
    for base, ours in zip(vanilla["long"], outs):
        meta = ours["meta_info"]
        assert meta["completion_tokens"] == LONG
        kept, evicted = expected_eviction(meta["prompt_tokens"], LONG)
        assert last(meta, "kv_tokens_evicted") == evicted > 0
        assert last(meta, "kv_tokens_kept") == kept
        assert ours["output_ids"][:first] == base["output_ids"][:first]
    assert pool_state(kara)["compression_events"] >= len(PROMPTS) * 3
    assert_pool_back_to_idle(kara)


def test_a_request_retracted_on_a_decode_server_resumes_compressed(kara):
    roomy = generate(kara, PROMPTS, LONG)
    # A pool a third of what the batch needs uncompressed, and almost no decode reservation
    # at admission: the running requests outgrow it and SGLang retracts some of them.
    tight = make_engine(_model(), **DECODE, **KARA, max_total_tokens=320, num_reserved_decode_tokens=2)
    try:
        outs = generate(tight, PROMPTS, LONG)
        assert sum(o["meta_info"]["num_retractions"] for o in outs) > 0  # the pool really ran out
        for ref, ours in zip(roomy, outs):
            assert ours["output_ids"] == ref["output_ids"]
            assert last(ours["meta_info"], "kv_tokens_evicted") == last(ref["meta_info"], "kv_tokens_evicted")
        assert_pool_back_to_idle(tight)
    finally:
        tight.shutdown()
