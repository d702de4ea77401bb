"""benchmarks/reasoning/score_probe.py: its pieces against independent computations, on the
tiny random-weight model (CPU)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "reasoning"))

pytestmark = [pytest.mark.sglang, pytest.mark.newest_release]  # needs transformers (SGLang's)


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()


def random_ids(n, seed=0):
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(seed))


def test_captured_queries_and_keys_reproduce_each_layers_attention(model):
    """Causal softmax(q k^T) v from the captured q/k (and v from its projection) equals what
    the attention layer hands its output projection."""
    import score_probe as sp

    ids = random_ids(90)
    seen = {}
    layer = model.model.layers[1].self_attn
    h1 = layer.v_proj.register_forward_hook(lambda _m, _i, out: seen.__setitem__("v", out[0]))
    h2 = layer.o_proj.register_forward_pre_hook(lambda _m, inp: seen.__setitem__("o", inp[0][0]))
    try:
        logits, cap = sp.capture_qk(model, ids)
    finally:
        h1.remove(), h2.remove()
    q, k = cap.q[1].double(), cap.k[1].double()  # [Hq, T, D], [Hkv, T, D]
    Hq, T, D = q.shape
    v = seen["v"].view(T, k.shape[0], D).transpose(0, 1).double().repeat_interleave(Hq // k.shape[0], 0)
    k = k.repeat_interleave(Hq // k.shape[0], 0)
    s = (q @ k.transpose(1, 2)) / math.sqrt(D)
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    attn = (s.softmax(-1) @ v).transpose(0, 1).reshape(T, Hq * D)
    assert torch.allclose(attn, seen["o"].double(), atol=1e-4)
    assert logits.shape == (T, model.config.vocab_size)


def test_mask_hides_dropped_tokens_from_their_compression_on(model):
    """Hiding tokens [a, b) from every query at b and later gives, from b on, the logits of the
    sequence without them (at the same positions): the custom mask is honoured as written."""
    import score_probe as sp

    ids, a, b = random_ids(80, seed=1), 30, 45
    T = ids.numel()
    allowed = torch.ones(T, T, dtype=torch.bool).tril()
    allowed[b:, a:b] = False
    masked = sp.masked_logits(model, ids, allowed)
    keep = torch.cat([torch.arange(a), torch.arange(b, T)])
    with torch.no_grad():
        short = model(ids[keep][None], position_ids=keep[None]).logits[0]
    assert torch.allclose(masked[b:], short[a:], atol=1e-4)
    assert torch.allclose(masked[:a], short[:a], atol=1e-4)
    full = sp.masked_logits(model, ids, torch.ones(T, T, dtype=torch.bool).tril())
    assert not torch.allclose(masked[b:], full[b:], atol=1e-3)  # the hidden tokens mattered


def test_schedule_and_mask_follow_kara():
    import score_probe as sp

    wins = sp.windows(prompt_len=10, total=10 + 3 * 16 + 7, window=16, buffer=4)
    assert wins == [(10, 30), (26, 46), (42, 62)]  # a window is due once W + U tokens exist
    assert sp.windows(10, 10 + 16 + 3, 16, 4) == []
    kept = torch.tensor([[0, 5, 6, 15]] * 3)
    allowed = sp.compressed_mask(70, wins, kept, 16, "cpu")
    for (start, due), row in zip(wins, kept):
        dropped = sorted(set(range(start, start + 16)) - {start + int(j) for j in row})
        assert not allowed[due:, dropped].any() and allowed[due - 1, dropped].all()
        assert allowed[due:, [start + int(j) for j in row]].all()  # kept: seen by every later query
    assert allowed[:, :10].sum() == torch.ones(70, 10).tril().sum()  # the prompt: causal only


def test_kara_scorer_is_the_servers(model):
    """The probe's `kara` scores equal the kernel's float64 reference fed what the server stores:
    the vote layers' queries, one GQA-group mean per KV head."""
    import score_probe as sp
    from kara_kernels.scorer import window_scores_reference

    from kara_sglang.config import KaraConfig

    _, cap = sp.capture_qk(model, random_ids(100, seed=2))
    W, U, start = 32, 8, 40
    ours = sp.score_windows("kara", cap, [(start, start + W + U)], W, U,
                            KaraConfig().resolve_vote_layers(cap.q.shape[0]), seed=0)
    L, Hq, T, D = cap.q.shape
    Hkv = cap.k.shape[1]
    q = cap.q[:, :, start:start + W + U].view(L, Hkv, Hq // Hkv, W + U, D).mean(2)  # [L, Hkv, nq, D]
    queries = q.permute(0, 2, 1, 3)[None]  # [rows=1, L, nq, Hkv, D]
    k_buffers = [cap.k[layer].transpose(0, 1).contiguous() for layer in range(L)]  # [T, Hkv, D] each
    ref = window_scores_reference(queries, torch.tensor([0]), k_buffers,
                                  torch.arange(start, start + W)[None], 1 / math.sqrt(D))
    assert torch.allclose(ours.double(), ref, rtol=1e-4, atol=1e-5)
    assert math.isclose(float(ours.sum()), L * Hkv * (W + U), rel_tol=1e-5)


@pytest.mark.parametrize("peak", [False, True])
def test_future_oracle_against_direct_attention(model, peak):
    """The oracle's scores equal each later query's causal attention on the window, computed
    per query in float64 (small blocks, so the block loop is exercised)."""
    import score_probe as sp

    _, cap = sp.capture_qk(model, random_ids(120, seed=3))
    wins, W = [(10, 40), (34, 64)], 30
    ours = sp.future_attention(cap, wins, W, peak=peak, block=16)
    L, Hq, T, D = cap.q.shape
    k = cap.k.double().repeat_interleave(Hq // cap.k.shape[1], dim=1)
    expected = torch.zeros(len(wins), W, dtype=torch.float64)
    for t in range(T):
        p = ((cap.q[:, :, t].double()[:, :, None] * k[:, :, :t + 1]).sum(-1) / math.sqrt(D)).softmax(-1)  # [L, Hq, t+1]
        for w, (start, due) in enumerate(wins):
            if t >= due:
                col = p[:, :, start:start + W].reshape(-1, W)
                expected[w] = torch.maximum(expected[w], col.max(0).values) if peak else expected[w] + col.sum(0)
    assert torch.allclose(ours.double(), expected, rtol=1e-4, atol=1e-6)


def test_probe_end_to_end_on_the_ledger(tiny_model, tmp_path):
    """The command on two short ledger problems: rows per style and setting; keep 1.0 keeps
    every token, so its predictions are the full-KV ones exactly."""
    import score_probe as sp

    out = tmp_path / "probe.json"
    sp.main(["--model", str(tiny_model), "--n", "2", "--window", "64", "--buffer", "16", "--trace-tokens", "160",
             "--settings", "kara@1.0,kara@0.25,kara-headmax@0.25,future@0.25,random@0.25", "--device", "cpu",
             "--out", str(out)])
    result = json.loads(out.read_text())
    settings = {(r["style"], r["setting"]) for r in result["rows"]}
    assert settings == {(s, k) for s in ("dense", "verbose")
                        for k in ("full", "kara@1", "kara@0.25", "kara-headmax@0.25", "future@0.25", "random@0.25")}
    for rec in result["records"]:
        o = rec["outcomes"]
        assert o["full"]["windows"] >= 2 and o["full"]["digits"] > 0
        assert o["kara@1"]["digits_right"] == o["full"]["digits_right"]
        assert o["kara@0.25"]["kept"] == 16 * o["full"]["windows"]


def test_report_splits_reads_by_where_their_copies_are(tiny_model, tmp_path):
    """report_probe.py recounts the probe's reads from the problems themselves; with every
    read right (full KV, keep 1.0) the compressed-only share is exactly 1."""
    import report_probe
    import score_probe as sp
    from transformers import AutoTokenizer

    out = tmp_path / "probe.json"
    sp.main(["--model", str(tiny_model), "--n", "2", "--styles", "dense", "--window", "32", "--buffer", "8",
             "--trace-tokens", "800", "--chunk-size", "2", "--settings", "kara@1.0,random@0.25", "--device", "cpu", "--out", str(out)])
    probe = json.loads(out.read_text())
    for rec in probe["records"]:  # the random model's reads are mostly wrong: make full KV perfect
        rec["outcomes"]["full"]["reads_right"] = rec["outcomes"]["full"]["reads"]
    rows = {r["setting"]: r for r in report_probe.report(probe, AutoTokenizer.from_pretrained(tiny_model))}
    full = rows["full"]
    assert full["compressed_only_reads"] > 0 and full["reads_with_uncompressed_copy"] > 0
    assert full["reads"] == sum(r["outcomes"]["full"]["reads"] for r in probe["records"])
    assert full["compressed_only_right_share"] == 1.0
    assert rows["random@0.25"]["compressed_only_reads"] == full["compressed_only_reads"]
