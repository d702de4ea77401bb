"""benchmarks/reasoning/recall_probe.py: its digests, masks and forwards against independent
computations, on the tiny random-weight model (CPU)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "reasoning"))

pytestmark = [pytest.mark.sglang, pytest.mark.newest_release]  # needs transformers (SGLang's)

T, PROMPT, W, U = 160, 10, 32, 8


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def probe(model):
    """Captured q/k of a random sequence and Kara's schedule on it (keep 25%, γ = 2)."""
    import recall_probe as rp
    import score_probe as sp

    ids = torch.randint(0, 500, (T,), generator=torch.Generator().manual_seed(5))
    _, cap = sp.capture_qk(model, ids)
    sched = rp.kara_schedule(cap, T, PROMPT, W, U, 0.25, 2, 0.5, page_sizes=(4, 8))
    return ids, cap, sched


def ref_scores(name, cap, sched, layer, rows, P):
    """Float64, loop by loop: max over each KV group's query heads; -inf off the candidates."""
    q, k = cap.q[layer].double(), cap.k[layer].double()
    Hq, Hkv, D = q.shape[0], k.shape[0], q.shape[-1]
    G = Hq // Hkv
    if name.startswith("bits"):
        bits, group = int(name[4:]), 8
        kq = torch.empty_like(k)
        for h in range(Hkv):
            for t in range(k.shape[1]):
                for g0 in range(0, D, group):
                    x = k[h, t, g0:g0 + group]
                    lo, hi = float(x.min()), float(x.max())
                    step = max((hi - lo) / (2 ** bits - 1), 1e-8)
                    kq[h, t, g0:g0 + group] = torch.tensor([lo + step * min(max(round((v - lo) / step), 0), 2 ** bits - 1)
                                                            for v in x.tolist()], dtype=torch.float64)
        k = kq
    if P > 1:
        pos, due = sched.pages[P]
        out = torch.full((Hkv, len(rows), pos.shape[0]), float("-inf"), dtype=torch.float64)
        for c in range(pos.shape[0]):
            toks = [int(x) for x in pos[c] if x >= 0]
            mn, mx = k[:, toks].min(1).values, k[:, toks].max(1).values  # [Hkv, D]
            for n, t in enumerate(rows):
                if int(due[c]) > t:
                    continue
                for g in range(Hkv):
                    out[g, n, c] = max(sum(max(q[h, t, d] * mn[g, d], q[h, t, d] * mx[g, d]) for d in range(D))
                                       for h in range(g * G, g * G + G))
        return out
    out = torch.full((Hkv, len(rows), k.shape[1]), float("-inf"), dtype=torch.float64)
    for n, t in enumerate(rows):
        for j in range(k.shape[1]):
            if int(sched.evict[j]) <= t:
                for g in range(Hkv):
                    out[g, n, j] = max(float(q[h, t] @ k[g, j]) for h in range(g * G, g * G + G))
    return out


@pytest.mark.parametrize("name,P", [("exact", 1), ("quest4", 4), ("bits2", 1), ("bits4", 1)])
def test_digest_scores_and_rankings_against_float64(probe, name, P):
    import recall_probe as rp

    _, cap, sched = probe
    dig = rp.Digest(name, cap, sched, bits_group=8)
    rows = [sched.first_due, sched.first_due + 7, T - 1]
    for layer in range(cap.q.shape[0]):
        ours = dig.layer_scores(layer, torch.tensor(rows)).double()
        ref = ref_scores(name, cap, sched, layer, rows, P)
        assert torch.equal(ours == float("-inf"), ref == float("-inf"))
        fin = ref > float("-inf")
        assert fin.any() and torch.allclose(ours[fin], ref[fin], rtol=1e-5, atol=1e-5)
        k = min(6, int(fin.sum(-1).min()))
        idx = ours.topk(k, dim=-1).indices
        assert torch.allclose(ref.gather(-1, idx), ref.topk(k, dim=-1).values, atol=1e-5)  # same ranking


def test_two_stage_digest_ranks_only_the_tokens_of_the_best_pages(probe):
    """quest4+bits4 with 8 prefilter tokens: each (KV head, query) keeps its two pages of 4
    with the highest Quest bound; their tokens carry their 4-bit-key scores, every other token
    -inf."""
    import recall_probe as rp

    _, cap, sched = probe
    dig = rp.Digest("quest4+bits4", cap, sched, bits_group=8, prefilter_tokens=8)
    pos, _ = sched.pages[4]
    rows = [sched.first_due, sched.first_due + 7, T - 1]
    for layer in range(cap.q.shape[0]):
        ours = dig.layer_scores(layer, torch.tensor(rows)).double()
        bounds = ref_scores("exact", cap, sched, layer, rows, 4)
        tokens = ref_scores("bits4", cap, sched, layer, rows, 1)
        want = torch.full_like(tokens, float("-inf"))
        for g in range(bounds.shape[0]):
            for n in range(len(rows)):
                fin = (bounds[g, n] > float("-inf")).nonzero().flatten().tolist()
                for c in sorted(fin, key=lambda c: -float(bounds[g, n, c]))[:2]:
                    for tok in (int(x) for x in pos[c] if x >= 0):
                        want[g, n, tok] = tokens[g, n, tok]
        assert torch.equal(ours == float("-inf"), want == float("-inf")), layer
        fin = want > float("-inf")
        assert fin.any() and torch.allclose(ours[fin], want[fin], rtol=1e-5, atol=1e-5)


def test_shared_scores_sum_softmaxes(probe):
    import recall_probe as rp

    _, cap, sched = probe
    dig = rp.Digest("exact", cap, sched)
    rows = [sched.first_due + 3, T - 1]
    ours = dig.shared_scores([0, 1], torch.tensor(rows))[0].double()
    D = cap.q.shape[-1]
    ref = sum((ref_scores("exact", cap, sched, layer, rows, 1) / math.sqrt(D)).softmax(-1).sum(0) for layer in (0, 1))
    fin = ref > 0
    assert torch.equal(ours > float("-inf"), fin) and torch.allclose(ours[fin], ref[fin], atol=1e-6)


def test_quest_bound_is_at_least_every_key_in_the_page(probe):
    import recall_probe as rp

    _, cap, sched = probe
    dig = rp.Digest("quest8", cap, sched)
    pos, _ = sched.pages[8]
    rows = torch.arange(sched.first_due, T)
    for layer in range(cap.q.shape[0]):
        bound = dig.layer_scores(layer, rows)  # [Hkv, n, C], -inf off the candidates
        exact = torch.einsum("hnd,htd->hnt", cap.q[layer][:, rows].double(),
                             cap.k[layer].double().repeat_interleave(dig.group, 0))
        exact = exact.view(-1, dig.group, *exact.shape[1:]).amax(1)  # [Hkv, n, T]
        for c in range(pos.shape[0]):
            toks = pos[c][pos[c] >= 0]
            live = bound[:, :, c] > float("-inf")
            assert live.any()
            top = exact[:, :, toks].amax(-1)
            assert (bound[:, :, c].double()[live] >= top[live] - 1e-5).all()
            assert (bound[:, :, c].double()[live] - top[live]).max() > 1e-3  # a bound, not equality


def test_resident_mask_is_score_probes_compressed_mask(probe):
    import recall_probe as rp
    import score_probe as sp
    from kara_sglang.config import KaraConfig
    from kara_sglang.token2chunk import token2chunk

    _, cap, sched = probe
    wins = sp.windows(PROMPT, T, W, U)
    scores = sp.score_windows("kara", cap, wins, W, U, KaraConfig().resolve_vote_layers(2), seed=0)
    cfg = KaraConfig(window=W, buffer=U, keep_ratio=0.25, chunk_size=2, chunk_fraction=0.5)
    kept = token2chunk(scores, cfg.window_budget, cfg.chunk_size, cfg.num_chunks)
    assert torch.equal(rp.resident_mask(sched.evict), sp.compressed_mask(T, wins, kept, W, "cpu"))
    assert int((sched.evict < rp.NEVER).sum()) == len(wins) * (W - cfg.window_budget)


@pytest.mark.parametrize("lag", [0, 1, 3, "e3"])
def test_mask_is_resident_union_selection_of_the_lagged_query(probe, lag):
    import recall_probe as rp

    _, cap, sched = probe
    g = torch.Generator().manual_seed(sum(map(ord, str(lag))))
    L, Hkv = 2, 2
    sel = torch.randint(0, T, (L, Hkv, T, 5), generator=g)
    sel = torch.minimum(sel, torch.arange(T).view(1, 1, T, 1)).to(torch.int32)  # causal, like a real selection
    resident = rp.resident_mask(sched.evict)
    for layer in range(L):
        ours = rp.setting_mask(resident, sel, layer, lag, Hkv)
        hand = torch.zeros(Hkv, T, T, dtype=torch.bool)
        for h in range(Hkv):
            for t in range(T):
                for j in range(t + 1):
                    hand[h, t, j] = int(sched.evict[j]) > t
                source = t - t % 3 if lag == "e3" else t - lag  # "e3": refreshed every 3 steps
                if source >= 0:
                    for j in sel[layer, h, source].tolist():
                        hand[h, t, j] = True
        assert torch.equal(ours, hand)
    # a shared selection ([1, 1, T, R]) serves every layer and head alike
    shared = rp.setting_mask(resident, sel[:1, :1], 1, lag, Hkv)
    assert torch.equal(shared[0], shared[1]) and torch.equal(shared[0], rp.setting_mask(resident, sel[:1, :1].expand(L, Hkv, -1, -1), 0, lag, Hkv)[1])


def test_forward_settings_take_a_lag_or_a_refresh_period():
    import recall_probe as rp

    assert rp.parse_forwards("bits4/layer@0.125:256:e4,exact/layer@0.25:64:2") == [
        ("bits4", "layer", 0.125, 256, "e4"), ("exact", "layer", 0.25, 64, "2")]
    assert [rp.lag_label(x) for x in ("0", "e4")] == ["lag0", "every4"]
    for bad in ("bits4/layer@0.125:256:e0", "bits4/layer@0.125:256:x", "quest16+bits4/shared@0.25:256:0"):
        with pytest.raises(SystemExit):
            rp.parse_forwards(bad)


@pytest.mark.parametrize("digest,scope", [("exact", "layer"), ("quest4", "layer"), ("bits2", "shared")])
def test_selecting_every_evicted_token_is_full_kv(model, probe, digest, scope):
    import recall_probe as rp

    ids, cap, sched = probe
    dig = rp.Digest(digest, cap, sched, bits_group=8)
    evicted = int((sched.evict < rp.NEVER).sum())
    sel = rp.selections(dig, scope, evicted + 8, T, [0, 1], block=37)
    lg = rp.recall_logits(model, ids, rp.resident_mask(sched.evict), [(sel, 0), (None, 0)])
    with torch.no_grad():
        full = model(ids[None]).logits[0]
    assert torch.allclose(lg[0], full, atol=1e-4)
    assert not torch.allclose(lg[1], full, atol=1e-3)  # the evicted tokens mattered


def test_no_selection_is_plain_kara(model, probe):
    import recall_probe as rp
    import score_probe as sp

    ids, cap, sched = probe
    resident = rp.resident_mask(sched.evict)
    plain = sp.masked_logits(model, ids, resident)
    dig = rp.Digest("exact", cap, sched)
    none = rp.selections(dig, "layer", 0, T, [0, 1])  # R = 0: only each query's own position
    lg = rp.recall_logits(model, ids, resident, [(None, 0), (none, 0), (none, 1)])
    for row in lg:
        assert torch.allclose(row, plain, atol=1e-4)


def test_selections_are_the_top_R_candidates(probe):
    import recall_probe as rp

    _, cap, sched = probe
    dig = rp.Digest("exact", cap, sched)
    sel = rp.selections(dig, "layer", 6, T, [0, 1], block=50)
    assert torch.equal(sel, rp.selections(dig, "layer", 6, T, [0, 1], block=50, budget=1))  # layer by layer
    for layer in range(2):
        rows = list(range(T))
        ref = ref_scores("exact", cap, sched, layer, rows, 1)
        for h in range(2):
            for t in rows:
                got = set(sel[layer, h, t].tolist()) - {t}
                n = int((ref[h, t] > float("-inf")).sum())
                want = set(ref[h, t].topk(min(6, n)).indices.tolist()) if n else set()
                assert got == want


def hard_case(cap, sched, enc_reads, enc_sources):
    import score_probe as sp

    return sp.Encoded(torch.zeros(T, dtype=torch.long), PROMPT, torch.tensor([]), enc_reads, enc_sources,
                      ["A"] * len(enc_reads))


@pytest.mark.parametrize("digest,scope", [("exact", "layer"), ("quest4", "layer"), ("exact", "shared"),
                                          ("quest8", "shared"), ("quest4+bits4", "layer")])
def test_need_and_churn_against_explicit_selections(probe, digest, scope):
    """value_need: the smallest R whose selection holds a whole copy equals checking the
    selections themselves, R by R; churn equals explicit set differences."""
    import recall_probe as rp

    _, cap, sched = probe
    ev = sched.evict.tolist()
    evicted = [j for j in range(T) if ev[j] < rp.NEVER]
    # reads late in the sequence whose two "copies" are evicted digit pairs (and one resident copy)
    reads, sources = [], []
    for n, r in enumerate(range(T - 30, T - 1, 6)):
        a, b = evicted[(5 * n) % len(evicted)], evicted[(5 * n + 9) % len(evicted)]
        reads.append([r, r + 1])
        sources.append([[a, a + 1 if a + 1 in evicted else a], [b, b]])
    reads.append([T - 2, T - 1]), sources.append([[evicted[0], evicted[1]], [T - 5, T - 4]])  # resident copy
    enc = hard_case(cap, sched, reads, sources)
    hr = rp.hard_reads(enc, sched.evict)
    assert len(hr.index) == len(reads) - 1
    dig = rp.Digest(digest, cap, sched, prefilter_tokens=8)  # two pages of 4: most tokens never ranked
    H = 3
    need = rp.value_need(dig, scope, hr, H, [0, 1], block=5)
    # one layer and one entry at a time (the memory-bounded path) gives the same
    assert torch.equal(need, rp.value_need(dig, scope, hr, H, [0, 1], block=3, budget=1))
    P = dig.P
    for R in (P, 2 * P, 4 * P, 8 * P, 16 * P):  # 16: more than the two-stage digest ever ranks
        sel = rp.selections(dig, scope, R, T, [0, 1])
        for n, (drows, copies) in enumerate(zip(hr.digit_rows, hr.copies)):
            for layer in range(sel.shape[0]):
                for h in range(sel.shape[1]):
                    for k in range(H + 1):
                        def held(copy):
                            return all(ev[tok] > row or (row - k >= 0 and tok in sel[layer, h, row - k].tolist())
                                       for row, tok in zip(drows, copy))
                        assert (need[n, layer, h, k] <= R) == any(held(c) for c in copies), (n, layer, h, k, R)
    new, samples = rp.churn(dig, scope, T, 3, [0, 1], grid=(P, 4 * P))
    assert torch.equal(new, rp.churn(dig, scope, T, 3, [0, 1], grid=(P, 4 * P), budget=1)[0])
    for gi, R in enumerate((P, 4 * P)):
        sel = rp.selections(dig, scope, R, T, [0, 1])
        ref = 0
        for t in range(sched.first_due + 1, T, 3):
            for layer in range(sel.shape[0]):
                for h in range(sel.shape[1]):
                    ref += len(set(sel[layer, h, t].tolist()) - set(sel[layer, h, t - 1].tolist()) - {t, t - 1})
        assert int(new[gi]) == ref
    assert samples == len(range(sched.first_due + 1, T, 3)) * sel.shape[0] * sel.shape[1]


def test_probe_end_to_end_on_the_ledger(tiny_model, tmp_path, capsys):
    """The command on a short ledger problem: a forward selecting more than is ever evicted
    reproduces full KV; R = 0 is plain Kara; the report prints both tables."""
    import recall_probe as rp

    out = tmp_path / "recall.json"
    rp.main(["--model", str(tiny_model), "--n", "1", "--styles", "dense", "--window", "32", "--buffer", "8",
             "--trace-tokens", "250", "--chunk-size", "2", "--ratios", "0.25,0.125", "--horizon", "3",
             "--churn-stride", "7", "--digests", "exact", "--scopes", "layer",
             "--forwards", "exact/layer@0.25:512:0,quest16/shared@0.25:512:1,exact/layer@0.125:0:0",
             "--device", "cpu", "--out", str(out)])
    result = json.loads(out.read_text())
    [rec] = result["records"]
    o = rec["outcomes"]
    assert o["exact/layer@0.25 R512 lag0"]["digits_right"] == o["full"]["digits_right"]
    assert o["exact/layer@0.125 R0 lag0"] == o["kara@0.125"]
    assert o["kara@0.25"]["hard_reads"] > 0
    assert set(result["stats"]["dense"]) == {f"{d}@{r:g}" for d in ("exact/layer", "exact/shared", "quest16/layer",
                                                                      "quest16/shared") for r in (0.25, 0.125)}
    st = result["stats"]["dense"]["exact/layer@0.25"]
    assert st["hard_reads"] == o["kara@0.25"]["hard_reads"]
    assert 0 < st["recall_lag0"][-1] <= st["hard_reads"] + 1e-6
    assert sum(st["lead_hist"][0]) == st["hard_reads"]
    capsys.readouterr()
    rp.main(["--report", str(out)])
    text = capsys.readouterr().out
    assert "exact/layer@0.25 R512 lag0" in text and "quest16/shared@0.125" in text and "kara@0.25" in text


def test_lead_and_weighted_recall_from_need():
    """add_need_stats by hand: two reads, two (layer, head) pairs, horizon 3."""
    import recall_probe as rp

    INF = rp.INF
    need = torch.tensor([[[[16, 16, INF, 16], [600, 600, 600, 600]]],  # read 0: pair 0 has it at k 0-1, not k 2
                         [[[INF, 0, 0, 0], [32, 32, 32, 32]]]])  # read 1: pair 1 holds it at 32 all along
    mass = torch.tensor([[[3.0, 1.0]], [[1.0, 1.0]]])  # read 0: pair 0 dominant; read 1: a tie (first wins)
    st = rp.new_stats(3)
    rp.add_need_stats(st, need, mass, 3)
    g = {R: i for i, R in enumerate(rp.R_GRID)}
    assert st["hard_reads"] == 2
    assert st["recall_lag0"][g[16]] == pytest.approx(0.75 + 0.0)
    assert st["recall_lag0"][g[32]] == pytest.approx(0.75 + 0.5)
    assert st["recall_lag1"][g[16]] == pytest.approx(0.75 + 0.5)  # read 1's pair 0: resident-need 0 at k = 1
    assert st["recall_lag0"][g[512]] == pytest.approx(0.75 + 0.5)
    # leads: read 0 (pair 0): in the top 16 at k = 0, 1, out at 2 -> 1; read 1 (pair 0): not at the read -> -1
    assert st["lead_hist"][g[16]] == [1, 0, 1, 0, 0]
    shared = rp.new_stats(3)
    rp.add_need_stats(shared, need[:, :1, :1], mass, 3)
    assert shared["recall_lag0"][g[16]] == 1 and shared["lead_hist"][g[512]] == [1, 0, 1, 0, 0]
