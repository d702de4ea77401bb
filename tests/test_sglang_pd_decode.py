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
import sys
from pathlib import Path

import pytest

from support.engines import assert_pool_back_to_idle, last, make_engine, pool_state, use_cpu_sglang
from test_sglang_engine import KARA, LONG, SHORT, U, W, expected_eviction, greedy

use_cpu_sglang()

from importlib import metadata  # noqa: E402

from kara_sglang.config import KaraConfigError  # noqa: E402
from kara_sglang.sglang_versions import PD_DECODE  # noqa: E402

try:
    SGLANG_VERSION = metadata.version("sglang")
except metadata.PackageNotFoundError:  # the core-only venv, where these tests are deselected
    SGLANG_VERSION = None
# Kara's PD decode path follows 0.5.17's retraction hooks; later releases refuse it at start-up.
VERIFIED = SGLANG_VERSION in PD_DECODE
pytestmark = pytest.mark.sglang
verified_only = pytest.mark.skipif(not VERIFIED, reason=f"PD decode with a policy is refused on SGLang "
                                                       f"{SGLANG_VERSION} (verified: {', '.join(PD_DECODE)})")

FAKE_PREFILL = str(Path(__file__).parent / "support" / "fake_prefill")
DECODE = dict(disaggregation_mode="decode", disaggregation_transfer_backend="fake")
PROMPTS = [[random.Random(i).randrange(10, 500) for _ in range(12 + 3 * i)] for i in range(8)]


@pytest.fixture(scope="module", autouse=True)
def fake_prefill_plugin():
    """Spawned schedulers load the fake-prefill plugin (restored after). They start with this
    process's ``sys.path`` (multiprocessing's spawn copies it), so both are extended."""
    before = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([FAKE_PREFILL] + [p for p in before.split(os.pathsep) if p])
    sys.path.insert(0, FAKE_PREFILL)
    yield
    sys.path.remove(FAKE_PREFILL)
    os.environ["PYTHONPATH"] = before


def generate(engine, prompts, n, **params):
    """Requests as a PD router would send them, bootstrap fields naming the fake prefill."""
    k = len(prompts)
    return engine.generate(input_ids=prompts, sampling_params=greedy(n, **params), bootstrap_host=["2.2.2.2"] * k,
                           bootstrap_port=[0] * k, bootstrap_room=list(range(1, k + 1)))


# SGLang's Engine.shutdown() ends every scheduler process of the test process, so the
# reference engines run to completion, one at a time, before the Kara engine starts.
@pytest.fixture(scope="module")
def vanilla(tiny_model):
    engine = make_engine(tiny_model, **DECODE)
    try:
        return {"short": generate(engine, PROMPTS, SHORT), "long": generate(engine, PROMPTS, LONG)}
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def tight(tiny_model, vanilla):
    """Kara's replies from a decode server whose pool runs out: a third of what the batch
    needs uncompressed, almost no decode reservation at admission, so SGLang retracts."""
    engine = make_engine(tiny_model, **DECODE, **KARA, max_total_tokens=320, num_reserved_decode_tokens=2)
    try:
        outs = generate(engine, PROMPTS, LONG)
        assert_pool_back_to_idle(engine)
        return outs
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def kara(tiny_model, vanilla, tight):
    engine = make_engine(tiny_model, **DECODE, **KARA)
    yield engine
    engine.shutdown()


@verified_only
def test_short_generations_on_a_decode_server_are_vanilla(vanilla, kara):
    outs = generate(kara, PROMPTS, SHORT)
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in vanilla["short"]]
    assert all(last(o["meta_info"], "kv_tokens_evicted") == 0 for o in outs)
    assert_pool_back_to_idle(kara)


@verified_only
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


@verified_only
def test_a_request_retracted_on_a_decode_server_resumes_compressed(kara, tight):
    assert sum(o["meta_info"]["num_retractions"] for o in tight) > 0  # the pool really ran out
    roomy = generate(kara, PROMPTS, LONG)
    for ref, ours in zip(roomy, tight):
        assert ours["output_ids"] == ref["output_ids"]
        assert last(ours["meta_info"], "kv_tokens_evicted") == last(ref["meta_info"], "kv_tokens_evicted")


@verified_only
def test_bad_per_request_values_on_a_decode_server_get_a_clean_error(kara):
    with pytest.raises(ValueError, match="kara-sglang: invalid custom_params") as err:
        generate(kara, PROMPTS[:1], 20, custom_params={"kara_keep_ratio": 2.0})
    assert "\n" not in str(err.value)
    (good,) = generate(kara, PROMPTS[:1], 20)
    assert good["meta_info"]["finish_reason"]["type"] == "length"
    assert_pool_back_to_idle(kara)


@verified_only
def test_opt_out_on_a_decode_server_is_vanilla(vanilla, kara):
    outs = generate(kara, PROMPTS, LONG, custom_params={"kv_policy": "none"})
    assert [o["output_ids"] for o in outs] == [o["output_ids"] for o in vanilla["long"]]
    assert all(last(o["meta_info"], "kv_tokens_evicted") == 0 for o in outs)


@pytest.mark.skipif(VERIFIED, reason="this release runs Kara on PD decode servers (the tests above)")
def test_a_decode_server_with_a_policy_is_refused_on_other_releases(tiny_model):
    with pytest.raises(KaraConfigError, match="PD decode server .* verified with SGLang"):
        make_engine(tiny_model, **KARA, **DECODE)
