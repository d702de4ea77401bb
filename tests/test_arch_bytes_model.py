"""benchmarks/arch_bytes_model.py: the bytes model per architecture (no SGLang, no GPU)."""

import re
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import arch_bytes_model as m  # noqa: E402
import report_throughput  # noqa: E402
from model_shapes import DEEPSEEK_V2_LITE, DEEPSEEK_V3, GPT_OSS_20B, LLAMA_31_8B, SHAPES  # noqa: E402

P, O = 1024, 16384


def arch(name):
    return next(a for a in m.architectures() if a.name == name)


def headline_counts():
    """headline.sh's default request counts for the bf16 rows (the H200's pool limits)."""
    text = (BENCHMARKS / "gpu" / "headline.sh").read_text()
    return [int(re.search(rf"{name}=\$\{{{name}:-(\d+)\}}", text).group(1)) for name in ("V_BF16", "K25_BF16", "K125_BF16")]


def test_llama_rows_are_report_throughputs_model_at_headlines_counts():
    llama = arch("llama-3.1-8b")
    assert m.count_weights(LLAMA_31_8B).total() * 2 == pytest.approx(report_throughput.WEIGHT_BYTES, rel=1e-4)
    assert m.kv_shape(LLAMA_31_8B).full == report_throughput.KV_BYTES_PER_TOKEN
    steps = [m.step(llama, P, O, keep) for _, keep in m.CONFIGS]
    assert [s.running for s in steps] == headline_counts()  # 48, 148, 231
    for s, (_, keep) in zip(steps, m.CONFIGS):
        avg, _ = report_throughput.kv_profile("vanilla" if keep is None else "kara", P, O, keep)
        expected = report_throughput.model_tok_per_s(s.running, avg, report_throughput.KV_BYTES_PER_TOKEN, 4.3e12)
        assert s.tok_per_s == pytest.approx(expected, rel=1e-4)
    assert steps[1].tok_per_s / steps[0].tok_per_s == pytest.approx(2.84, abs=0.005)  # docs/throughput.md


@pytest.mark.parametrize("config, total, active", [
    (DEEPSEEK_V3, 671e9, 36.6e9),  # DeepSeek-V3's README: 671B, 36.6B activated (with the LM head)
    (DEEPSEEK_V2_LITE, 15.7e9, 2.4e9),  # 15.7B, 2.4B activated (rounded: 2.45B here)
    (GPT_OSS_20B, 20.9e9, 3.6e9),  # 20.9B, 3.6B active
], ids=["deepseek-v3", "deepseek-v2-lite", "gpt-oss-20b"])
def test_parameter_counts_match_the_published_totals_and_active_parameters(config, total, active):
    weights = m.count_weights(config)
    assert weights.total() == pytest.approx(total, rel=0.005)
    # One token touches k routed experts a layer; published active counts leave out the input embedding.
    one_token = weights.params_per_step(1) - config["vocab_size"] * config["hidden_size"]
    assert one_token == pytest.approx(active, rel=0.025)


def test_moe_weights_read_grow_with_the_batch_towards_every_expert():
    weights = m.count_weights(DEEPSEEK_V3)
    k, experts = DEEPSEEK_V3["num_experts_per_tok"], DEEPSEEK_V3["n_routed_experts"]
    assert weights.params_per_step(1) == pytest.approx(weights.always + 58 * k * weights.expert)
    reads = [weights.params_per_step(b) for b in (1, 8, 34, 105, 164, 1000)]
    assert reads == sorted(reads) and reads[0] < reads[-1]
    assert reads[-1] == pytest.approx(weights.total(), rel=1e-6)
    assert 1 - (1 - k / experts) ** 34 < 0.7  # a 34-request step leaves a third of the experts unread
    dense = m.count_weights(LLAMA_31_8B)
    assert dense.params_per_step(1) == dense.params_per_step(256) == dense.total()


def test_mla_kv_is_the_latent_row_of_every_layer():
    assert m.kv_shape(DEEPSEEK_V3).full == 61 * (512 + 64) * 2 == 70_272
    assert m.kv_shape(SHAPES["deepseek-v3-cut"].config).full == 4 * 576 * 2
    assert m.kv_shape(DEEPSEEK_V2_LITE).full == 27 * 576 * 2
    assert m.kv_shape(DEEPSEEK_V3).sliding == 0


def test_gpt_oss_sliding_layers_are_bounded_and_not_compressed():
    kv = m.kv_shape(GPT_OSS_20B)
    assert kv.full == kv.sliding == 12 * 2 * 8 * 64 * 2 and kv.window == 128
    assert m.sliding_average(kv, P, 4096) == m.sliding_average(kv, P, O) == 128
    assert m.sliding_average(kv, 16, 112) < 128  # a short request holds fewer than the window
    gpt_oss = arch("gpt-oss-20b")
    assert gpt_oss.buffer >= kv.window  # Kara's U must cover the sliding window
    for _, keep in m.CONFIGS:
        s = m.step(gpt_oss, P, O, keep)
        full = s.kv_bytes - s.running * 128 * kv.sliding
        assert full == pytest.approx(s.running * m.average_kv(P, O, keep, gpt_oss.buffer) * kv.full)
    # SGLang's hybrid pool: a full-layer token plus 0.8 of a sliding-layer one.
    assert kv.pool_bytes_per_token() == pytest.approx(kv.full * 1.8)


def test_deepseek_v3_cut_runs_at_the_tp8_ranks_concurrency():
    rank, cut = arch("deepseek-v3 TP8 rank (fp8)"), arch("deepseek-v3-cut")
    assert m.count_weights(DEEPSEEK_V3, tp=8).total() * m.FP8 == pytest.approx(84e9, rel=0.02)
    assert cut.pool() == rank.pool() == m.rank_pool_tokens()
    for _, keep in m.CONFIGS:
        r, c = m.step(rank, P, O, keep), m.step(cut, P, O, keep)
        assert r.running == c.running < m.MAX_RUNNING_REQUESTS
        assert c.kv_share < r.kv_share  # bf16 whole layers: more weight bytes per KV byte than the rank
    # The cut's weights and pool fit one H200's budget, and an H100's.
    assert cut.weights().total() * m.BF16 + cut.pool() * cut.kv().full < m.H100.static_bytes < m.H200.static_bytes


def test_the_device_sets_bandwidth_and_pools_but_not_the_h200_ranks_pool():
    on_h100 = {a.name: a for a in m.architectures(m.H100)}
    assert on_h100["llama-3.1-8b"].pool() == pytest.approx(report_throughput.DEFAULT_POOL_TOKENS, abs=8)  # H100 headline
    for name in ("deepseek-v2-lite", "gpt-oss-20b"):
        assert on_h100[name].pool() < arch(name).pool()
    assert on_h100["deepseek-v3-cut"].pool() == arch("deepseek-v3-cut").pool() == m.rank_pool_tokens()
    h100, h200 = m.step(on_h100["deepseek-v3-cut"], P, O), m.step(arch("deepseek-v3-cut"), P, O)
    assert h100.running == h200.running
    assert h100.seconds / h200.seconds == pytest.approx(m.H200.bandwidth / m.H100.bandwidth)
    row = {"model": "gpt-oss-20b", "prompt_len": P, "output_len": O, "peak_running_requests": 30}
    modelled = {d: report_throughput.arch_model_tok_per_s({**row, "policy": "vanilla", "device": d})
                for d in ("NVIDIA H100 80GB HBM3", "NVIDIA H200", "a GPU the model does not know")}
    assert modelled["NVIDIA H100 80GB HBM3"] < modelled["NVIDIA H200"] == modelled["a GPU the model does not know"]
    with pytest.raises(SystemExit, match="known: NVIDIA H200, NVIDIA H100"):
        m.device_named("NVIDIA A100")


def test_counts_are_capped_at_the_running_request_limit():
    lite = arch("deepseek-v2-lite")
    assert m.step(lite, P, O, 0.125).running == m.MAX_RUNNING_REQUESTS
    assert lite.pool() // m.admitted_tokens(P, O, 0.125) > m.MAX_RUNNING_REQUESTS


def test_report_throughput_compares_rows_within_their_model_and_models_them_per_architecture(tmp_path):
    common = dict(prompt_len=P, output_len=O, request_rate=None, tp_size=1, attention_backend="fa3",
                  kv_cache_dtype="auto", overlap=True, device="NVIDIA H200", window=512, buffer=64, budget=None)
    runs = {"cut": [dict(common, model="deepseek-v3-cut", policy="vanilla", keep_ratio=None, workload="34x#0",
                         num_requests=34, peak_running_requests=34, output_tok_per_s=3000.0),
                    dict(common, model="deepseek-v3-cut", policy="kara", keep_ratio=0.25, workload="105x#0",
                         num_requests=105, peak_running_requests=105, output_tok_per_s=6600.0)],
            # A Llama vanilla row of the same workload and settings, without a model field (older rows),
            # read first (its file sorts first): only the model tells the baselines apart.
            "a-llama": [dict(common, policy="vanilla", keep_ratio=None, workload="48x#0", num_requests=48,
                           peak_running_requests=48, output_tok_per_s=2575.0)]}
    for name, rows in runs.items():
        (tmp_path / f"row-{name}.json").write_text(__import__("json").dumps(rows))
        (tmp_path / f"log-{name}.txt").write_text("")
    rows = report_throughput.collect(str(tmp_path))
    report_throughput.add_gains(rows)
    by = {(r["model"], r["policy"]): r for r in rows}
    assert set(by) == {("deepseek-v3-cut", "vanilla"), ("deepseek-v3-cut", "kara"), ("llama-3.1-8b", "vanilla")}
    kara, vanilla = by["deepseek-v3-cut", "kara"], by["deepseek-v3-cut", "vanilla"]
    cut = arch("deepseek-v3-cut")
    assert kara["model_tok_per_s"] == pytest.approx(m.step(cut, P, O, 0.25, running=105).tok_per_s)
    assert vanilla["model_tok_per_s"] == pytest.approx(m.step(cut, P, O, running=34).tok_per_s)
    assert kara["vanilla_workload"] == "34x#0" and kara["gain_vs_vanilla"] == pytest.approx(2.2)
    assert kara["model_gain"] == pytest.approx(kara["model_tok_per_s"] / vanilla["model_tok_per_s"])
    assert by["llama-3.1-8b", "vanilla"]["model_tok_per_s"] == pytest.approx(
        report_throughput.model_tok_per_s(48, P + O / 2, bandwidth=4.3e12))


def test_cpu_variants_keep_each_shapes_family_and_features():
    llama = SHAPES["llama-3.1-8b"].cpu_config()
    assert (llama["num_hidden_layers"], llama["hidden_size"], llama["vocab_size"]) == (2, 256, 128256)
    for name in ("deepseek-v3-cut", "deepseek-v2-lite"):
        full, tiny = SHAPES[name].config, SHAPES[name].cpu_config()
        assert tiny["architectures"] == full["architectures"] and tiny["vocab_size"] == full["vocab_size"]
        assert tiny["num_hidden_layers"] > tiny["first_k_dense_replace"]  # an MoE layer
        assert tiny["kv_lora_rank"] < full["kv_lora_rank"] and bool(tiny["q_lora_rank"]) == bool(full["q_lora_rank"])
        assert tiny["rope_scaling"]["type"] == "yarn"  # the only RoPE SGLang's CPU path has for DeepSeek
        assert (SHAPES[name].cpu_plugin / "kara_test_mla_cpu.py").exists()
    gpt_oss = SHAPES["gpt-oss-20b"].cpu_config()
    assert set(gpt_oss["layer_types"]) == {"sliding_attention", "full_attention"}
    assert len(gpt_oss["layer_types"]) == gpt_oss["num_hidden_layers"] <= 4
    assert gpt_oss["num_local_experts"] > gpt_oss["num_experts_per_tok"]
    assert "quantization_config" not in GPT_OSS_20B  # bf16 experts: the dummy loader cannot fill MXFP4


def test_bench_serving_reads_peaks_from_mha_mla_and_hybrid_sliding_window_decode_lines():
    from bench_serving import peaks_from_log

    log = "\n".join([
        "BENCH-START 4x64+200#0",
        "[t] Decode batch, #running-req: 4, #token: 644, token usage: 0.11, cpu graph: False",
        "[t] Decode batch, #running-req: 3, #full token: 700, full token usage: 0.08, #swa token: 168, swa token usage: 0.04",
        "BENCH-END 4x64+200#0"])
    assert peaks_from_log(log) == {"4x64+200#0": {"peak_running_requests": 4, "peak_kv_tokens": 700}}
