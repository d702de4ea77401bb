"""FP8 KV caches: Kara scores byte-stored float8 keys with SGLang's scales, and runs in SGLang.

The scorer against a float64 reference on the dequantised keys (fresh random inputs, scales,
both float8 formats), then real SGLang with ``kv_cache_dtype="fp8_e4m3"``: token-identical
to vanilla SGLang's FP8 cache until the first compression, compressions on schedule, SGLang's
strict memory checks on; CASK and LongFlow are refused with one line.
"""

import pytest
import torch

from kara_kernels import window_scores
from kara_kernels.scorer import window_scores_reference
from kara_sglang.fp8_kv import FP8_DTYPES, dequantized_window_keys


@pytest.mark.parametrize("fp8", FP8_DTYPES, ids=["e4m3", "e5m2"])
def test_scores_of_fp8_keys_match_float64_on_the_dequantised_keys(fp8, device):
    seed = 32
    g = torch.Generator().manual_seed(seed)
    n_layers, slots, kv_heads, head_dim, q_heads = 3, 300, 2, 32, 4
    windows, n_keys, n_queries = 3, 40, 12
    scales = [float(s) for s in torch.rand(n_layers, generator=g) * 2 + 0.25]
    real = [torch.randn(slots, kv_heads, head_dim, generator=g) for _ in range(n_layers)]
    # Stored as SGLang stores them: (k / k_scale) as float8, kept as bytes.
    stored = [(k / s).to(fp8).view(torch.uint8).to(device) for k, s in zip(real, scales)]
    queries = torch.randn(5, n_layers, n_queries, q_heads, head_dim, generator=g).to(torch.float32).to(device)
    rows = torch.randperm(5, generator=g)[:windows].to(device)
    key_slots = torch.stack([torch.randperm(slots, generator=g)[:n_keys] for _ in range(windows)]).to(device)

    dense, dense_slots = dequantized_window_keys(stored, scales, key_slots, fp8, queries.dtype)
    got = window_scores(queries, rows, dense, dense_slots, head_dim ** -0.5)
    dequantised = [(s.view(fp8).double() * scale) for s, scale in zip(stored, scales)]
    want = window_scores_reference(queries, rows, dequantised, key_slots, head_dim ** -0.5)
    assert torch.isfinite(got).all(), f"seed {seed}"
    assert torch.linalg.norm(got.double() - want) / torch.linalg.norm(want) < 1e-4, f"seed {seed}"
    # The scale matters: scoring the raw float8 values (scale 1) gives other scores.
    unscaled = window_scores_reference(queries, rows, [s.view(fp8).double() for s in stored], key_slots,
                                       head_dim ** -0.5)
    assert torch.linalg.norm(unscaled - want) / torch.linalg.norm(want) > 1e-3, f"seed {seed}"


@pytest.mark.sglang
def test_kara_on_an_fp8_cache_matches_vanilla_fp8_until_the_first_compression(tiny_model):
    from support.engines import ON_GPU, assert_pool_back_to_idle, last, make_engine, pool_state, use_cpu_sglang

    use_cpu_sglang()
    import sglang

    if not ON_GPU and sglang.__version__ != "0.5.17":
        # Vanilla too: from 0.5.18 on SGLang's CPU engine keeps an FP8 cache in its own
        # quantised CPU pool and only on Intel AMX. Tested on 0.5.17 (CI) and on the GPU.
        pytest.skip(f"SGLang {sglang.__version__}'s CPU engine has no plain FP8 KV pool")
    W, U, n = 32, 8, 3 * 32 + 8 + 5
    prompts = ["the first step is", "one two three four five six"]
    params = dict(temperature=0, max_new_tokens=n, ignore_eos=True)
    engine = make_engine(tiny_model, kv_cache_dtype="fp8_e4m3")
    try:
        base = engine.generate(prompts, params)
    finally:
        engine.shutdown()
    engine = make_engine(tiny_model, kv_cache_dtype="fp8_e4m3", kv_policy="kara", kara_window=W, kara_buffer=U,
                         kara_keep_ratio=0.25, kara_chunk_size=2)
    try:
        ours = engine.generate(prompts, params)
        for b, o in zip(base, ours):
            assert o["output_ids"][:W + U + 1] == b["output_ids"][:W + U + 1]
            assert last(o["meta_info"], "kv_tokens_evicted") == 3 * (W - W // 4)
        assert pool_state(engine)["compression_events"] == 3 * len(prompts)
        assert_pool_back_to_idle(engine)
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def refusals(request, tiny_model):
    """Both launches side by side (support.cli): each is one SGLang import, stopped by the flag."""
    from support import cli
    from support.engines import use_cpu_sglang
    from support.http_server import CPU_ARGS, SERVER

    use_cpu_sglang()  # the server subprocess inherits the CPU engine's environment
    commands = {policy: SERVER + ["--model-path", str(tiny_model), "--kv-policy", policy, "--kv-cache-dtype",
                                  "fp8_e4m3"] + CPU_ARGS + (["--kara-budget", "128"] if policy == "longflow" else [])
                for policy in ("cask", "longflow")}
    return cli.run_all(cli.selected_cases(request, commands, lambda item: getattr(item, "callspec", None)
                                          and item.callspec.params.get("policy")))


@pytest.mark.sglang
@pytest.mark.newest_release  # the same start-up check as test_sglang_http's, which runs on every release
@pytest.mark.parametrize("policy", ["cask", "longflow"])
def test_policies_without_fp8_support_are_refused_with_one_line(refusals, policy):
    proc = refusals[policy]
    assert proc.returncode == 2
    assert f"error: --kv-cache-dtype: --kv-policy {policy} does not support an FP8 KV cache yet" in proc.stderr
    assert "Traceback" not in proc.stderr
