"""``--kv-policy kara`` on SGLang's MLA KV pool (DeepSeek-V2 architecture), through real SGLang.

The model is a tiny random-weight DeepSeek-V2 (``build_tiny_model(arch="deepseek_v2")``:
latent rows of 64 + 16 channels, YaRN RoPE); SGLang runs it on the CPU with the
``torch_native`` attention backend, decode in latent space (``attn_mqa``, the absorbed MLA path)
and, with the test plugin ``support/mla_cpu`` (why: its docstring), prefill too. Kara scores
with the absorbed queries against the latent rows and moves latent rows. SGLang's strict
per-step memory checks and Kara's double-free checks are on (``support.engines.TEST_ENV``).

On a GPU (``KARA_TEST_DEVICE=cuda``, ``benchmarks/gpu/run_arch_suite.sh``) the engines take
the suite's GPU settings (``support.engines``; ``KARA_TEST_ATTENTION_BACKEND=default``: SGLang's
choice, FlashAttention-3 on Hopper), without the CPU plugin, and the model has DeepSeek's
own latent dimensions (512 + 64, nope 128, v 128: what FA3's MLA kernels are built for);
``KARA_TEST_MLA_DIMS=kv_lora_rank,rope,nope,v`` sets others.
"""

import os
import sys
from pathlib import Path

import pytest

from support.engines import (ON_GPU, assert_pool_back_to_idle, assert_pool_consistent, flush, last, make_engine,
                             pool_state, shared_engine, use_cpu_sglang)
from test_sglang_engine import KARA, LONG, OPT_OUT, PROMPTS, SHORT, SYSTEM, U, W, expected_eviction, greedy, run_conversation

pytestmark = pytest.mark.sglang

use_cpu_sglang()

MLA_CPU = str(Path(__file__).parent / "support" / "mla_cpu")


@pytest.fixture(scope="module", autouse=True)
def mla_cpu_plugin():
    """Schedulers load the MLA-on-torch_native plugin (restored after). They start with this
    process's environment and ``sys.path``, so both are extended. Not on a GPU (SGLang's own
    MLA backends there)."""
    if ON_GPU:
        yield
        return
    before = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = os.pathsep.join([MLA_CPU] + [p for p in before.split(os.pathsep) if p])
    sys.path.insert(0, MLA_CPU)
    yield
    sys.path.remove(MLA_CPU)
    os.environ["PYTHONPATH"] = before


@pytest.fixture(scope="module")
def mla_model(tmp_path_factory):
    from kara_sglang.demo_model import MLA_DEEPSEEK, MLA_TINY, build_tiny_model

    dims = os.environ.get("KARA_TEST_MLA_DIMS")
    dims = tuple(int(d) for d in dims.split(",")) if dims else MLA_DEEPSEEK if ON_GPU else MLA_TINY
    return build_tiny_model(tmp_path_factory.mktemp("tiny_mla_model"), arch="deepseek_v2", mla_dims=dims)


@pytest.fixture(scope="module")
def vanilla(mla_model):
    engine = shared_engine(mla_model)
    return {
        "short": engine.generate(PROMPTS, greedy(SHORT)),
        "long": engine.generate(PROMPTS, greedy(LONG)),
        "opt_out": engine.generate(PROMPTS[0], greedy(OPT_OUT)),
        "conversation": run_conversation(engine),
    }


@pytest.fixture
def kara(mla_model, vanilla):
    return shared_engine(mla_model, **KARA)


def test_short_generations_are_token_identical_to_vanilla(vanilla, kara):
    events = pool_state(kara)["compression_events"]
    ours = kara.generate(PROMPTS, greedy(SHORT))
    for b, o in zip(vanilla["short"], ours):
        assert o["output_ids"] == b["output_ids"]
        assert last(o["meta_info"], "kv_tokens_evicted") == 0
    assert pool_state(kara)["compression_events"] == events


def test_compression_fires_on_schedule_and_matches_vanilla_until_then(vanilla, kara):
    n = LONG
    before = pool_state(kara)
    ours = kara.generate(PROMPTS, greedy(n))
    for b, o in zip(vanilla["long"], ours):
        meta = o["meta_info"]
        kept, evicted = expected_eviction(meta["prompt_tokens"], n)
        assert last(meta, "kv_tokens_evicted") == evicted > 0
        assert last(meta, "kv_tokens_kept") == kept
        first = W + U + 1  # everything before the first compression is vanilla's
        assert o["output_ids"][:first] == b["output_ids"][:first]
    state = assert_pool_consistent(kara)
    assert state["compression_events"] - before["compression_events"] >= len(PROMPTS) * 3
    assert state["kv_slots_freed"] - before["kv_slots_freed"] == sum(
        last(o["meta_info"], "kv_tokens_evicted") for o in ours)
    assert_pool_back_to_idle(kara)


def test_per_request_opt_out_is_vanilla(vanilla, kara):
    opt_out, half = kara.generate(
        [PROMPTS[0], PROMPTS[0]],
        [greedy(OPT_OUT, custom_params={"kv_policy": "none"}), greedy(OPT_OUT, custom_params={"kara_keep_ratio": 0.5})])
    assert opt_out["output_ids"] == vanilla["opt_out"]["output_ids"]
    assert last(opt_out["meta_info"], "kv_tokens_evicted") == 0
    assert last(half["meta_info"], "kv_tokens_evicted") == 2 * (W - W // 2)
    assert_pool_back_to_idle(kara)


def test_shared_prefix_and_multi_turn_keep_their_cached_tokens(mla_model, vanilla, kara):
    shared, turn2, _, _ = run_conversation(kara)
    base_shared, base_turn2, _, _ = vanilla["conversation"]
    assert shared == base_shared >= len(SYSTEM)  # the radix prefix is untouched
    assert len(SYSTEM) + 2 <= turn2 < base_turn2  # only the exact prefix went to the tree
    # The second turn re-prefills the rest, so its KV is exact again: its output is what vanilla
    # gives for the same prompt (Kara's own first answer, which differs from vanilla's after
    # the first compression).
    flush(kara)
    first = kara.generate(input_ids=SYSTEM + [11, 12], sampling_params=greedy(3 * W))
    prompt = SYSTEM + [11, 12] + first["output_ids"] + [21, 22]
    ours = kara.generate(input_ids=prompt, sampling_params=greedy(10))
    assert len(SYSTEM) + 2 <= ours["meta_info"]["cached_tokens"] < len(prompt) - 2
    assert_pool_back_to_idle(kara)
    base = shared_engine(mla_model).generate(input_ids=prompt, sampling_params=greedy(10))
    assert ours["output_ids"] == base["output_ids"]


def test_page_size_16_moves_latent_rows_and_gives_the_same_outputs(mla_model, kara):
    n = 3 * W + U + 7
    flush(kara)
    ref = kara.generate(PROMPTS, greedy(n))
    engine = make_engine(mla_model, page_size=16, **KARA)
    try:
        ours = engine.generate(PROMPTS, greedy(n))
        state = assert_pool_consistent(engine)
        assert state["compression_events"] > 0
        assert_pool_back_to_idle(engine)
    finally:
        engine.shutdown()
    for p, r in zip(ours, ref):
        # Same keep sets, latent rows compacted into whole pages: attention sees the same KV.
        assert last(p["meta_info"], "kv_tokens_evicted") == last(r["meta_info"], "kv_tokens_evicted") > 0
        assert p["output_ids"] == r["output_ids"]


@pytest.mark.parametrize("policy", [dict(kv_policy="threshold", kara_budget=24, kara_buffer=8),
                                    dict(kv_policy="streaming", kara_budget=24, kara_buffer=8),
                                    dict(kv_policy="cask", kara_window=W, kara_buffer=U, kara_keep_ratio=0.25)],
                         ids=["threshold", "streaming", "cask"])
@pytest.mark.newest_release  # the pool handling is Kara's (above), run on every release
def test_the_other_policies_run_on_the_mla_pool(mla_model, vanilla, policy):
    engine = make_engine(mla_model, **policy)
    try:
        outs = engine.generate(PROMPTS[:3], greedy(LONG))
        state = assert_pool_consistent(engine)
        assert state["compression_events"] > 0
        assert_pool_back_to_idle(engine)
    finally:
        engine.shutdown()
    first = 24 + 8 + 1 if policy["kv_policy"] != "cask" else W + U + 1  # before the first compression
    for o, b in zip(outs, vanilla["long"]):
        assert last(o["meta_info"], "kv_tokens_evicted") > 0
        assert o["output_ids"][:first] == b["output_ids"][:first]


@pytest.mark.slow
def test_tensor_parallel_ranks_keep_the_same_latent_rows(mla_model):
    """tp_size=2 (two ranks, gloo): MLA's latent cache is replicated on every rank while the
    query heads are split, so each rank scores with its own heads' absorbed queries and the
    scores are summed over the ranks before selection. With Kara's debug checks on, every
    compression compares the ranks' keep sets, freed slots and rows (a divergence kills the
    scheduler); at the end the ranks' whole tables and free lists are compared."""
    plain = make_engine(mla_model, tp_size=2)
    try:
        want = [o["output_ids"] for o in plain.generate(PROMPTS, greedy(SHORT))]
    finally:
        plain.shutdown()
    engine = make_engine(mla_model, tp_size=2, **KARA)
    try:
        # Nothing compressed yet: the outputs of vanilla at the same TP size.
        assert [o["output_ids"] for o in engine.generate(PROMPTS, greedy(SHORT))] == want
        outs = engine.generate(PROMPTS, greedy(LONG))
        assert all(last(o["meta_info"], "kv_tokens_evicted") > 0 for o in outs)
        state = pool_state(engine)
        assert state["tp_size"] == 2 and state["compression_events"] > 0, state
        assert 0 < state["score_allreduces"] <= state["compression_events"], state
        digests = state["tp_state_digests"]
        assert len(digests) == 2 and digests[0] == digests[1], digests
        assert_pool_back_to_idle(engine)
    finally:
        engine.shutdown()
