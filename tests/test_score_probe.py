"""benchmarks/reasoning/score_probe.py: its pieces against independent computations, on a
tiny random-weight model (CPU) of 6 layers, so that Kara's 4 voting layers (1, 2, 4 and 5:
evenly spaced, ending at the last) are a strict subset and choosing them matters."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "reasoning"))

pytestmark = [pytest.mark.sglang, pytest.mark.newest_release]  # needs transformers (SGLang's)

LAYERS = 6
VOTE_LAYERS = [1, 2, 4, 5]  # written out: KaraConfig's default of 4 voting layers in 6 layers
EVAL_SEED0 = 1_000_000  # the probe's first held-out problem (train.py)


@pytest.fixture(scope="module")
def tiny6_model(tmp_path_factory):
    from kara_sglang.demo_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny6_model"), layers=LAYERS)


@pytest.fixture(scope="module")
def model(tiny6_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny6_model, dtype=torch.float32, attn_implementation="sdpa").eval()


def random_ids(n, seed=0):
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(seed))


def window_probs64(q, k):
    """float64 softmax of each query over the window keys, no causal mask, per layer and
    query head: ``q [L, Hq, nq, D]``, ``k [L, Hkv, W, D]`` -> ``[L, Hq, nq, W]``."""
    k = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return (torch.einsum("lhqd,lhkd->lhqk", q.double(), k) / math.sqrt(q.shape[-1])).softmax(-1)


def kara_scores64(cap, start, due, window, layers):
    """Kara's scores by hand: the listed layers' queries of the tail [start, due), one mean
    query per KV head, softmax over the window keys, summed."""
    q = cap.q[layers, :, start:due].double()
    L, Hq, nq, D = q.shape
    Hkv = cap.k.shape[1]
    q = q.view(L, Hkv, Hq // Hkv, nq, D).mean(2)
    return window_probs64(q, cap.k[layers, :, start:start + window]).sum(dim=(0, 1, 2))


def headmax_scores64(cap, start, due, window):
    """Every layer and query head: column sums over the tail's queries, then the max."""
    p = window_probs64(cap.q[:, :, start:due], cap.k[:, :, start:start + window])
    return p.sum(2).flatten(0, 1).max(0).values


def future_scores64(cap, wins, window, peak, block=128):
    """In float64: every query's causal softmax over all keys; per window, the weight each
    query from the window's compression (``due``) on puts on the window's keys, summed over
    queries, layers and heads (``peak``: the largest single weight)."""
    L, Hq, T, D = cap.q.shape
    k = cap.k.double().repeat_interleave(Hq // cap.k.shape[1], dim=1)  # [L, Hq, T, D]
    expected = torch.zeros(len(wins), window, dtype=torch.float64)
    for t0 in range(0, T, block):
        t = torch.arange(t0, min(T, t0 + block))
        logits = torch.einsum("lhqd,lhkd->lhqk", cap.q[:, :, t].double(), k) / math.sqrt(D)
        p = logits.masked_fill(torch.arange(T)[None, :] > t[:, None], float("-inf")).softmax(-1)
        for w, (start, due) in enumerate(wins):
            later = p[:, :, t >= due, start:start + window].reshape(-1, window)  # (layer, head, query) rows
            if later.shape[0]:
                expected[w] = torch.maximum(expected[w], later.max(0).values) if peak else expected[w] + later.sum(0)
    return expected


def top(scores, k, exclude=()):
    order = sorted((i for i in range(len(scores)) if i not in exclude), key=lambda i: -scores[i])
    return set(order[:k])


def token2chunk_by_hand(scores, budget, seeds, gamma):
    """Token2Chunk's rule in plain Python: the top ``seeds`` tokens grow ``gamma - 1`` times
    towards the higher neighbour (left on a tie, the other side at an edge), the union of the
    chunks is kept and the best other tokens fill the budget."""
    n = len(scores)
    chunk = set()
    for s in top(scores, seeds):
        lo = hi = s
        for _ in range(gamma - 1):
            left = scores[lo - 1] if lo > 0 else -math.inf
            right = scores[hi + 1] if hi + 1 < n else -math.inf
            if left >= right:
                lo -= 1
            else:
                hi += 1
        chunk |= set(range(lo, hi + 1))
    return sorted(chunk | top(scores, budget - len(chunk), exclude=chunk))


def hand_windows(prompt_len, total, window, buffer):
    """Kara's schedule: window k covers keys [P + kW, P + (k+1)W) and is compressed once the
    tail [P + kW, P + (k+1)W + U) exists."""
    return [(s, s + window + buffer) for s in range(prompt_len, total - window - buffer + 1, window)]


def hand_mask(T, wins, kept, window):
    """True where a query may attend: ``allowed[t, j] = j <= t < hidden_from[j]``, where a
    token dropped from its window is hidden from the window's compression (``due``) on and
    every other token never (``T``)."""
    hidden_from = torch.full((T,), T)
    for (start, due), keep in zip(wins, kept):
        for j in range(window):
            if j not in keep:
                hidden_from[start + j] = due
    t, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return (j <= t) & (t < hidden_from[None, :])


def ledger_tokens(tokenizer, problem):
    """Prompt, completion and end of turn tokenized apart (as training did), independently
    of the probe: ``(ids, prompt length, completion char -> token, digit token positions)``."""
    prompt = tokenizer(problem.prompt).input_ids
    enc = tokenizer(problem.completion, return_offsets_mapping=True)
    P = len(prompt)
    char_tok, digits = {}, []
    for j, (a, b) in enumerate(enc.offset_mapping):
        for c in range(a, b):
            char_tok[c] = P + j
        if problem.completion[a:b].strip().isdigit():
            digits.append(P + j)
    ids = prompt + enc.input_ids + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return ids, P, char_tok, digits


def test_captured_queries_and_keys_reproduce_each_layers_attention(model):
    """Causal softmax(q k^T) v from the captured q/k (and v from its projection) equals what
    the attention layer hands its output projection."""
    import score_probe as sp

    ids = random_ids(90)
    seen = {}
    layer = model.model.layers[4].self_attn
    h1 = layer.v_proj.register_forward_hook(lambda _m, _i, out: seen.__setitem__("v", out[0]))
    h2 = layer.o_proj.register_forward_pre_hook(lambda _m, inp: seen.__setitem__("o", inp[0][0]))
    try:
        logits, cap = sp.capture_qk(model, ids)
    finally:
        h1.remove(), h2.remove()
    assert cap.q.shape[0] == cap.k.shape[0] == LAYERS
    q, k = cap.q[4].double(), cap.k[4].double()  # [Hq, T, D], [Hkv, T, D]
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
    kept = torch.tensor([[0, 5, 6, 15], [1, 2, 3, 9], [4, 7, 8, 14]])
    allowed = sp.compressed_mask(70, wins, kept, 16, "cpu")
    assert torch.equal(allowed, hand_mask(70, wins, [set(r.tolist()) for r in kept], 16))


def test_kara_scorer_is_the_servers(model):
    """The probe's `kara` scores equal the kernel's float64 reference fed what the server stores:
    the voting layers' queries (1, 2, 4, 5 of 6), one GQA-group mean per KV head. The other
    layers would score differently."""
    import score_probe as sp
    from kara_kernels.scorer import window_scores_reference

    from kara_sglang.config import KaraConfig

    assert KaraConfig().resolve_vote_layers(LAYERS) == tuple(VOTE_LAYERS)  # the server's default
    _, cap = sp.capture_qk(model, random_ids(100, seed=2))
    W, U, start = 32, 8, 40
    ours = sp.score_windows("kara", cap, [(start, start + W + U)], W, U, VOTE_LAYERS, seed=0)
    L, Hq, T, D = cap.q.shape
    Hkv = cap.k.shape[1]

    def reference(layers):
        q = cap.q[layers, :, start:start + W + U].view(len(layers), Hkv, Hq // Hkv, W + U, D).mean(2)
        queries = q.permute(0, 2, 1, 3)[None]  # [rows=1, n_vote, nq, Hkv, D]
        k_buffers = [cap.k[layer].transpose(0, 1).contiguous() for layer in layers]  # [T, Hkv, D] each
        return window_scores_reference(queries, torch.tensor([0]), k_buffers,
                                       torch.arange(start, start + W)[None], 1 / math.sqrt(D))

    ref = reference(VOTE_LAYERS)
    assert torch.allclose(ours.double(), ref, rtol=1e-4, atol=1e-5)
    assert torch.allclose(ref[0], kara_scores64(cap, start, start + W + U, W, VOTE_LAYERS), rtol=1e-9)
    assert math.isclose(float(ours.sum()), len(VOTE_LAYERS) * Hkv * (W + U), rel_tol=1e-5)
    # Selection matters here: every layer, or the non-voting ones, would keep other tokens.
    assert top(reference(list(range(LAYERS)))[0].tolist(), 8) != top(ref[0].tolist(), 8)
    assert top(reference([0, 3])[0].tolist(), 8) != top(ref[0].tolist(), 8)


@pytest.mark.parametrize("peak", [False, True])
def test_future_oracle_against_direct_attention(model, peak):
    """The oracle's scores equal each later query's causal attention on the window, computed
    per query in float64 (small blocks, so the block loop is exercised)."""
    import score_probe as sp

    _, cap = sp.capture_qk(model, random_ids(120, seed=3))
    wins, W = [(10, 40), (34, 64)], 30
    ours = sp.future_attention(cap, wins, W, peak=peak, block=16)
    assert torch.allclose(ours.double(), future_scores64(cap, wins, W, peak), rtol=1e-4, atol=1e-6)


def test_probe_end_to_end_on_the_ledger(tiny6_model, tmp_path, monkeypatch):
    """The command on a short ledger problem per style, checked against a computation by
    hand of what each setting should do: the windows (Kara's schedule from the problem's own
    tokenization), each scorer's float64 scores (Kara: only the 4 voting layers), the keep
    sets (Token2Chunk by hand on those scores: budget 16 of 64, one seed of 8), the attention
    mask (by its definition), and the digits and reads each setting gets right (the masked
    forward's predictions at the problem's digit tokens, found by hand). keep 1.0 keeps every token: its predictions are full KV's exactly."""
    import ledger
    import score_probe as sp
    from transformers import AutoTokenizer

    scored, masks = [], []
    score_windows, masked_logits = sp.score_windows, sp.masked_logits

    def recording_scores(name, cap, wins, *args, **kwargs):
        out = score_windows(name, cap, wins, *args, **kwargs)
        scored.append((name, cap, list(wins), out.clone()))
        return out

    def recording_mask(model, ids, allowed):
        logits = masked_logits(model, ids, allowed)
        masks.append((ids.clone(), allowed.clone(), logits.clone()))
        return logits

    monkeypatch.setattr(sp, "score_windows", recording_scores)
    monkeypatch.setattr(sp, "masked_logits", recording_mask)
    out = tmp_path / "probe.json"
    settings = ["kara@1", "kara@0.25", "kara-headmax@0.25", "future@0.25", "random@0.25"]
    sp.main(["--model", str(tiny6_model), "--n", "1", "--window", "64", "--buffer", "16", "--trace-tokens", "160",
             "--settings", "kara@1.0,kara@0.25,kara-headmax@0.25,future@0.25,random@0.25", "--device", "cpu",
             "--out", str(out)])
    result = json.loads(out.read_text())
    assert {(r["style"], r["setting"]) for r in result["rows"]} == {
        (s, k) for s in ("dense", "verbose") for k in ["full"] + settings}
    tokenizer = AutoTokenizer.from_pretrained(tiny6_model)
    W, U, BUDGET, SEEDS, GAMMA = 64, 16, 16, 1, 8  # keep 25% of 64; floor(0.5 * 16 / 8) seeds of 8
    records = result["records"]
    assert [(r["style"], r["seed"]) for r in records] == [
        (s, EVAL_SEED0) for s in ("verbose", "dense")]
    # Per problem: 4 scorers (kara once for both keeps), 5 masked forwards, in settings order.
    assert len(scored) == 4 * len(records) and len(masks) == 5 * len(records)
    for n, rec in enumerate(records):
        where = f"{rec['style']} seed {rec['seed']}"
        problem = ledger.make_problem(rec["style"], rec["seed"], 160)
        ids, P, char_tok, digit_pos = ledger_tokens(tokenizer, problem)
        T = len(ids)
        wins = hand_windows(P, T, W, U)
        assert len(wins) >= 2, where
        mine = scored[4 * n: 4 * n + 4]
        assert [m[0] for m in mine] == ["kara", "kara-headmax", "future", "random"], where
        cap = mine[0][1]
        for name, _cap, got_wins, scores in mine:
            assert got_wins == wins, f"{where} {name}"
            if name == "kara":
                want = torch.stack([kara_scores64(cap, s, d, W, VOTE_LAYERS) for s, d in wins])
                other = torch.stack([kara_scores64(cap, s, d, W, list(range(LAYERS))) for s, d in wins])
                assert [top(r.tolist(), BUDGET) for r in other] != [top(r.tolist(), BUDGET) for r in want], where
            elif name == "kara-headmax":
                want = torch.stack([headmax_scores64(cap, s, d, W) for s, d in wins])
            elif name == "future":
                want = future_scores64(cap, wins, W, peak=False)
            else:
                want = None
                assert scores.shape == (len(wins), W) and 0 <= scores.min() and scores.max() < 1, where
            if want is not None:
                assert torch.allclose(scores.double(), want, rtol=1e-4, atol=1e-6), f"{where} {name}"
        kept = {"kara@1": [set(range(W))] * len(wins)}
        for (name, *_rest, scores), setting in zip(mine, settings[1:]):
            kept[setting] = [set(token2chunk_by_hand(row.tolist(), BUDGET, SEEDS, GAMMA)) for row in scores]
        o = rec["outcomes"]
        for (got_ids, allowed, logits), setting in zip(masks[5 * n: 5 * n + 5], settings):
            assert got_ids.tolist() == ids, where
            assert torch.equal(allowed, hand_mask(T, wins, kept[setting], W)), f"{where} {setting}"
            # (That the model honours the mask is test_mask_hides_dropped_tokens_from_their_compression_on.)
            right = {p: bool(logits[p - 1].argmax() == ids[p]) for p in digit_pos}
            reads = [sorted({char_tok[c] for c in (char, char + 1) if char_tok.get(c) in right})
                     for char, _account, _sources in problem.all_reads]
            reads = [r for r in reads if r]
            assert o[setting]["digits"] == len(digit_pos) and o[setting]["reads"] == len(reads), f"{where} {setting}"
            assert o[setting]["digits_right"] == sum(right.values()), f"{where} {setting}"
            assert o[setting]["reads_right"] == sum(all(right[p] for p in r) for r in reads), f"{where} {setting}"
            assert o[setting]["kept"] == sum(map(len, kept[setting])), f"{where} {setting}"
        assert o["kara@1"] == dict(o["full"], kept=W * len(wins)), where
        # The scorers disagree: the probe compares different keep sets.
        assert kept["kara@0.25"] != kept["future@0.25"] != kept["random@0.25"], where


def test_report_splits_reads_by_where_their_copies_are(tiny6_model, tmp_path):
    """report_probe.py recounts the probe's reads from the problems themselves: which reads
    have every copy inside a window already compressed when they are written (checked here
    against the problems tokenized and scheduled by hand), and the share of those still right
    per setting ((reads right - reads with an uncompressed copy) / compressed-only reads)."""
    import ledger
    import report_probe
    import score_probe as sp
    from transformers import AutoTokenizer

    W, U = 32, 8
    out = tmp_path / "probe.json"
    sp.main(["--model", str(tiny6_model), "--n", "2", "--styles", "dense", "--window", str(W), "--buffer", str(U),
             "--trace-tokens", "800", "--chunk-size", "2", "--settings", "kara@1.0,random@0.25", "--device", "cpu",
             "--out", str(out)])
    probe = json.loads(out.read_text())
    tokenizer = AutoTokenizer.from_pretrained(tiny6_model)
    easy = hard = 0
    for rec in probe["records"]:
        problem = ledger.make_problem("dense", rec["seed"], 800)
        ids, P, char_tok, _digits = ledger_tokens(tokenizer, problem)
        wins = hand_windows(P, len(ids), W, U)
        for char, _account, sources in problem.all_reads:
            at = char_tok[char]
            compressed = [any(s <= char_tok[c] < s + W and due <= at for s, due in wins) for c in sources]
            hard += all(compressed)
            easy += not all(compressed)
    assert easy > 0 and hard > 0  # both kinds occur, so a swap or a miscount shows
    # Reads right per setting, set here to values that tell the fields apart.
    right = {"full": easy + hard, "kara@1": easy, "random@0.25": easy - 1}
    for i, rec in enumerate(probe["records"]):
        for setting, total in right.items():
            rec["outcomes"][setting]["reads_right"] = total // 2 + (total % 2 if i == 0 else 0)
    rows = {r["setting"]: r for r in report_probe.report(probe, tokenizer)}
    for setting, total in right.items():
        row = rows[setting]
        assert (row["reads"], row["reads_with_uncompressed_copy"], row["compressed_only_reads"]) == (
            easy + hard, easy, hard), setting
        assert row["reads_right"] == total and row["problems"] == 2, setting
        assert math.isclose(row["compressed_only_right_share"], (total - easy) / hard), setting
    assert rows["full"]["compressed_only_right_share"] == 1.0
