"""Recall (kara_sglang/recall.py): the attention over resident + selected evicted tokens, the
store of held slots, the settings; and through real SGLang, with SGLang's strict busy/idle
memory checks and Kara's double-free check on (tests/support/engines.py)."""

import json
import random
from pathlib import Path

import pytest
import torch

from kara_sglang import KaraConfig
from kara_sglang.config import KaraConfigError
from kara_kernels.recall import rank_evicted
from kara_sglang.recall import RecallStore, recall_attention


def _reference_quantised(key, bits, group=32):
    """Per token and head, per group of channels: round to ``bits`` between the group's min and max."""
    out = []
    for start in range(0, len(key), group):
        g = key[start:start + group]
        lo, hi = min(g), max(g)
        step = max(hi - lo, 1e-8) / (2 ** bits - 1)
        out += [round((x - lo) / step) * step + lo for x in g]
    return out


def _reference(q, select_q, k, v, resident, evicted, R, digest, scale, kv="exact"):
    """Loops in float64: per request, KV head and query head, softmax over the resident tokens
    and the R evicted tokens whose digest score (max over the group) is highest (their K and V
    rounded to ``kv`` bits when it names some)."""
    B, Hq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, Dv, dtype=torch.float64)
    for b in range(B):
        for h in range(Hkv):
            def digest_key(slot):
                key = k[slot, h].double().tolist()
                return key if digest == "exact" else _reference_quantised(key, int(digest[4:]))
            ranked = sorted(evicted[b], key=lambda s: -max(
                sum(a * c for a, c in zip(select_q[b, h * G + g].double().tolist(), digest_key(s)))
                for g in range(G)))
            def stored(buf, s, recalled):
                row = buf[s, h].double().tolist()
                if recalled and kv != "exact":
                    row = _reference_quantised(row, int(kv[4:]))
                return torch.tensor(row, dtype=torch.float64)
            attended = [(s, False) for s in resident[b]] + [(s, True) for s in ranked[:R]]
            for g in range(G):
                qh = q[b, h * G + g].double()
                logits = torch.stack([qh @ stored(k, s, rc) * scale for s, rc in attended])
                w = logits.softmax(0)
                out[b, h * G + g] = sum(w[i] * stored(v, s, rc) for i, (s, rc) in enumerate(attended))
    return out


@pytest.mark.parametrize("digest, kv", [("exact", "exact"), ("bits2", "exact"), ("bits4", "exact"),
                                        ("bits2", "bits4"), ("exact", "bits2")])
@pytest.mark.parametrize("R", [0, 3, 1000])
def test_recall_attention_matches_a_float64_loop(digest, kv, R):
    seed = 1000 + R + len(digest) + len(kv)
    gen = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, D, slots = 3, 4, 2, 64, 80
    k = torch.randn(slots, Hkv, D, generator=gen)
    v = torch.randn(slots, Hkv, D, generator=gen)
    q = torch.randn(B, Hq, D, generator=gen)
    select_q = torch.randn(B, Hq, D, generator=gen)  # lag 1: another query ranks
    perm = torch.randperm(slots - 1, generator=gen) + 1
    res_lens, ev_lens = [5, 9, 2], [7, 0, 12]
    resident, evicted, at = [], [], 0
    for n_res, n_ev in zip(res_lens, ev_lens):
        resident.append(perm[at:at + n_res].tolist()); at += n_res
        evicted.append(perm[at:at + n_ev].tolist()); at += n_ev

    def padded(lists):
        width = max(len(x) for x in lists)
        return torch.tensor([x + [0] * (width - len(x)) for x in lists], dtype=torch.int64)

    # Rows in the tables out of batch order, and a table wider than any count (as in the server).
    rows = torch.tensor([2, 0, 1])
    res_table, ev_table = torch.zeros(3, 20, dtype=torch.int64), torch.zeros(3, 16, dtype=torch.int64)
    res_table[rows, :padded(resident).shape[1]] = padded(resident)
    ev_table[rows, :padded(evicted).shape[1]] = padded(evicted)
    got = recall_attention(q, select_q, k, v, res_table, torch.tensor(res_lens), ev_table, rows,
                           torch.tensor(ev_lens), R, digest, 0.125, kv=kv)
    want = _reference(q, select_q, k, v, resident, evicted, R, digest, 0.125, kv)
    assert torch.allclose(got.double(), want, atol=1e-4), f"seed {seed}: {(got.double() - want).abs().max()}"


def test_all_evicted_recalled_is_full_attention_and_none_is_resident_only():
    gen = torch.Generator().manual_seed(7)
    k, v = torch.randn(40, 1, 32, generator=gen), torch.randn(40, 1, 32, generator=gen)
    q = torch.randn(1, 2, 32, generator=gen)
    resident, evicted = torch.tensor([[1, 5, 9]]), torch.tensor([[2, 3, 4, 6]])

    def plain(slots):
        logits = torch.einsum("hd,nd->hn", q[0], k[slots, 0]) * 0.2
        return (logits.softmax(-1) @ v[slots, 0])[None]

    row = torch.tensor([0])
    full = recall_attention(q, q, k, v, resident, torch.tensor([3]), evicted, row, torch.tensor([4]), 4, "exact", 0.2)
    assert torch.allclose(full, plain(torch.tensor([1, 5, 9, 2, 3, 4, 6])), atol=1e-5)
    none = recall_attention(q, q, k, v, resident, torch.tensor([3]), evicted, row, torch.tensor([4]), 0, "exact", 0.2)
    assert torch.allclose(none, plain(torch.tensor([1, 5, 9])), atol=1e-5)


@pytest.mark.parametrize("bits", [0, 2, 3, 4])
def test_rank_scores_are_the_digest_dot_products_max_over_the_group(bits):
    """The ranking kernel's values (not only their order) against float64: past a row's count -inf."""
    seed = 40 + bits
    gen = torch.Generator().manual_seed(seed)
    B, Hq, Hkv, D, slots = 2, 6, 2, 64, 50
    k = torch.randn(slots, Hkv, D, generator=gen) * 3
    q = torch.randn(B, Hq, D, generator=gen)
    table = torch.randint(0, slots, (4, 9), generator=gen)
    rows, lens = torch.tensor([3, 1]), torch.tensor([9, 4])
    got = rank_evicted(q, k, table, rows, lens, 11, bits, 0.3)
    assert got.shape == (B, Hkv, 11)
    for b in range(B):
        for h in range(Hkv):
            for e in range(11):
                if e >= lens[b]:
                    assert got[b, h, e] == float("-inf"), f"seed {seed}"
                    continue
                key = k[table[rows[b], e], h].double().tolist()
                key = torch.tensor(key if bits == 0 else _reference_quantised(key, bits), dtype=torch.float64)
                want = max(float(q[b, h * 3 + g].double() @ key) for g in range(3)) * 0.3
                assert abs(float(got[b, h, e]) - want) < 1e-4, f"seed {seed}: b={b} h={h} e={e}"
    if bits:  # the digest differs from the key: a kernel that ignored BITS would fail above
        exact = rank_evicted(q, k, table, rows, lens, 11, 0, 0.3)
        assert (exact[:, :, :4] - got[:, :, :4]).abs().max() > 1e-2


def test_tier_stores_whole_windows_falls_back_when_full_and_releases_once():
    """RecallTier: each row's window is quantised into free tier slots (whole windows only,
    in eviction order), a window that does not fit is counted as fallen back, and releases
    put every slot back once."""
    from kara_kernels.recall_tier import rank_tier
    from kara_sglang.recall_tier import RecallTier

    layers, heads, dim, slots = 2, 2, 32, 40
    k = [torch.randn(slots, heads, dim) for _ in range(layers)]
    v = [torch.randn(slots, heads, dim) for _ in range(layers)]
    tier = RecallTier(layers, 10, heads, dim, dim, 4, rows=3, row_capacity=8, device=torch.device("cpu"))
    assert tier.store([0, 2], [4, 3], torch.tensor([5, 6, 7, 8, 30, 31, 32]), k, v) == 7
    assert tier.held == 7 and tier.rows.counts.tolist() == [4, 0, 3]
    # 3 free: a 4-token window falls back whole, the next 2-token one fits.
    assert tier.store([1, 0], [4, 2], torch.tensor([1, 2, 3, 4, 9, 10]), k, v) == 2
    assert tier.fallback_tokens == 4 and tier.held == 9 and tier.rows.counts.tolist() == [6, 0, 3]
    # Row 0's tier tokens, ranked with a query equal to one stored key, put that key first.
    q = k[1][8, 1].repeat(heads, 1)[None]  # row 0's 4th token (pool slot 8), KV head 1
    rank = rank_tier(q, *tier.layer(1)[:3], tier.rows.slots, torch.tensor([0]), tier.rows.counts[[0]], 6, 4, 1.0)
    assert rank[0, 1].argmax().item() == 3
    assert tier.release(0) == 6 and tier.release(0) == 0 and tier.held == 3
    tier.check_free_once()
    assert tier.release(2) == 3 and tier.held == 0
    assert sorted(tier.free_slots.tolist()) == list(range(10))


def test_tier_pages_hold_the_bounds_of_their_tokens_through_stores_and_releases():
    """With two-stage ranking, each row's pages name bound pages whose bounds equal the max/min
    of the page's keys after every store (a row's partial last page grows across windows), and
    releases give every bound page back once."""
    from kara_kernels.recall_pages import PAGE
    from kara_sglang.recall_tier import RecallTier
    from test_recall_tier_kernels import _dequant64, _unpack

    seed = random.randrange(2 ** 31)
    gen = torch.Generator().manual_seed(seed)
    layers, heads, dim, slots = 2, 2, 32, 200
    k = [torch.randn(slots, heads, dim, generator=gen) for _ in range(layers)]
    tier = RecallTier(layers, 120, heads, dim, dim, 4, rows=3, row_capacity=60, device=torch.device("cpu"), pages=True)
    # Pages end mid-window and grow; row 2 is stored twice in one call.
    windows = [([0, 2], [20, 7]), ([0], [13]), ([2, 0, 2], [10, 9, 8])]
    src = iter(torch.randperm(slots, generator=gen).tolist())
    for rows, counts in windows:
        pool = torch.tensor([next(src) for _ in range(sum(counts))])
        assert tier.store(rows, counts, pool, k, k) == sum(counts)
        for layer in range(layers):
            keys = _dequant64(_unpack(tier.k_codes[layer], 4), tier.k_lo[layer], tier.k_step[layer])
            table, hi, lo = tier.layer_pages(layer)
            for row, n in tier.rows.counts_by_row().items():
                for p in range(-(-n // PAGE)):
                    page_keys = keys[tier.rows.slots[row, p * PAGE:min(n, (p + 1) * PAGE)]]
                    bound = int(table[row, p])
                    assert torch.allclose(hi[bound].double(), page_keys.amax(0), rtol=2 ** -10, atol=1e-6), seed
                    assert torch.allclose(lo[bound].double(), page_keys.amin(0), rtol=2 ** -10, atol=1e-6), seed
    assert tier.rows.counts.tolist() == [42, 0, 25] and tier.pages_held == 3 + 2
    tier.check_free_once()
    assert tier.release(0) == 42 and tier.pages_held == 2 and tier.release(0) == 0 and tier.pages_held == 2
    tier.check_free_once()
    tier.free_pages[tier.n_free_pages - 1] = tier.page_table[2, 0]  # a page both free and used
    with pytest.raises(AssertionError, match="bound page"):
        tier.check_free_once()


@pytest.mark.parametrize("count, incoming, horizon, drop", [
    (0, 24, 32, 0), (8, 24, 32, 0), (24, 24, 32, 16), (32, 24, 32, 32), (40, 24, 48, 16), (100, 30, 64, 80)])
def test_horizon_drops_whole_pages_or_the_whole_row(count, incoming, horizon, drop):
    from kara_sglang.recall_tier import RecallTier

    assert RecallTier.horizon_drop(count, incoming, horizon) == drop


def test_a_horizon_keeps_each_rows_newest_tokens_and_their_page_bounds():
    """Dropping a row's oldest tier tokens (whole pages, or the whole row) frees exactly those
    slots and bound pages once, keeps the row's later slots in order at its front, and leaves
    every remaining page's bounds equal to the max/min of its tokens' keys."""
    from kara_kernels.recall_pages import PAGE
    from kara_sglang.recall_tier import RecallTier
    from test_recall_tier_kernels import _dequant64, _unpack

    seed = random.randrange(2 ** 31)
    gen = torch.Generator().manual_seed(seed)
    layers, heads, dim, slots = 2, 2, 32, 300
    k = [torch.randn(slots, heads, dim, generator=gen) for _ in range(layers)]
    tier = RecallTier(layers, 160, heads, dim, dim, 4, rows=3, row_capacity=80, device=torch.device("cpu"), pages=True)
    src = iter(torch.randperm(slots, generator=gen).tolist())
    for rows, counts in (([0, 1], [30, 20]), ([0, 1], [27, 9])):
        assert tier.store(rows, counts, torch.tensor([next(src) for _ in range(sum(counts))]), k, k) == sum(counts)
    before = tier.rows.slots[0, :57].tolist()
    free_slots, free_pages = tier.n_free, tier.n_free_pages
    with pytest.raises(AssertionError, match="splits a page"):
        tier.drop_oldest(0, 20)
    tier.drop_oldest(0, 2 * PAGE)
    assert tier.rows.count(0) == 57 - 2 * PAGE and tier.rows.slots[0, :25].tolist() == before[2 * PAGE:], seed
    assert tier.n_free == free_slots + 2 * PAGE and tier.n_free_pages == free_pages + 2, seed
    assert set(tier.free_slots[:tier.n_free].tolist()) >= set(before[:2 * PAGE])
    tier.drop_oldest(1, 29)  # the whole row
    assert tier.rows.count(1) == 0 and tier.dropped_tokens == 2 * PAGE + 29
    tier.check_free_once()
    # The next store appends after the kept tokens; every page's bounds hold its tokens.
    assert tier.store([0], [20], torch.tensor([next(src) for _ in range(20)]), k, k) == 20
    for layer in range(layers):
        keys = _dequant64(_unpack(tier.k_codes[layer], 4), tier.k_lo[layer], tier.k_step[layer])
        table, hi, lo = tier.layer_pages(layer)
        n = tier.rows.count(0)
        for p in range(-(-n // PAGE)):
            page_keys = keys[tier.rows.slots[0, p * PAGE:min(n, (p + 1) * PAGE)]]
            assert torch.allclose(hi[int(table[0, p])].double(), page_keys.amax(0), rtol=2 ** -10, atol=1e-6), seed
            assert torch.allclose(lo[int(table[0, p])].double(), page_keys.amin(0), rtol=2 ** -10, atol=1e-6), seed
    tier.check_free_once()
    assert tier.release(0) == 45 and tier.held == 0 and tier.pages_held == 0
    tier.check_free_once()


def test_store_holds_per_row_in_order_and_releases_once():
    store = RecallStore(rows=4, capacity=6, device=torch.device("cpu"))
    store.hold([2, 0], [3, 1], torch.tensor([11, 12, 13, 20]))
    store.hold([2], [2], torch.tensor([14, 15]))
    assert store.held == 6 and store.longest == 5 and store.count(1) == 0
    assert store.counts.tolist() == [1, 0, 5, 0]
    assert store.release(2).tolist() == [11, 12, 13, 14, 15]
    assert store.release(2).numel() == 0 and store.held == 1 and store.counts[2] == 0
    with pytest.raises(AssertionError, match="capacity"):
        store.hold([0], [6], torch.arange(6))
    with pytest.raises(AssertionError, match="counted"):
        store.hold([1], [1], torch.tensor([1, 2]))


@pytest.mark.parametrize("changes, message", [
    (dict(recall_tokens=-1), "--kara-recall-tokens: must be an integer >= 0"),
    (dict(recall_tokens=8, policy="cask"), "--kara-recall-tokens: recall is built for the kara policy"),
    (dict(recall_digest="bits8"), "--kara-recall-digest: must be one of"),
    (dict(recall_lag=2), "--kara-recall-lag: must be 0 or 1"),
    (dict(recall_kv="bits16"), "--kara-recall-kv: must be one of"),
    (dict(recall_tier_tokens=-5, recall_tokens=8, recall_kv="bits4"), "--kara-recall-tier-tokens: must be an integer"),
    (dict(recall_pages=-1), "--kara-recall-pages: must be an integer >= 0"),
    (dict(recall_pages=4, recall_tokens=8), "--kara-recall-pages: .* set --kara-recall-tier-tokens"),
    (dict(recall_pages=1, recall_tokens=32, recall_tier_tokens=1000, recall_kv="bits4"),
     "--kara-recall-pages: 1 pages of 16 tokens hold fewer than the 32"),
    (dict(recall_horizon=-1), "--kara-recall-horizon: must be an integer >= 0"),
    (dict(recall_horizon=600, recall_tokens=8), "--kara-recall-horizon: .* set --kara-recall-tier-tokens"),
    (dict(recall_horizon=500, recall_tokens=8, recall_tier_tokens=1000, recall_kv="bits4"),
     "--kara-recall-horizon: 500 tokens hold neither a whole window \\(512\\)"),
    (dict(recall_tier_tokens=1000, recall_kv="bits4"), "--kara-recall-tier-tokens: .* set --kara-recall-tokens"),
    (dict(recall_tier_tokens=1000, recall_tokens=8), "--kara-recall-tier-tokens: the tier stores K and V at"),
    (dict(recall_tier_tokens=1000, recall_tokens=8, recall_kv="bits3"), "--kara-recall-tier-tokens: the tier stores"),
    (dict(recall_tier_tokens=1000, recall_tokens=8, recall_kv="bits4", recall_digest="bits2"),
     "--kara-recall-tier-tokens: tier tokens are ranked by the tier's own keys"),
])
def test_bad_recall_settings_are_refused_naming_the_flag(changes, message):
    with pytest.raises(KaraConfigError, match=message):
        KaraConfig(**changes)


def test_cuda_graphs_are_refused_for_the_emulation_only():
    """The emulation attends outside CUDA graphs; a tier's buffer fill is captured with them."""
    from types import SimpleNamespace

    from kara_patches.server_args import check_recall

    args = SimpleNamespace(page_size=1, device="cuda", disable_cuda_graph=False, kv_cache_dtype="auto",
                           disaggregation_mode="null")
    with pytest.raises(KaraConfigError, match="CUDA graphs without a tier"):
        check_recall(args, KaraConfig(policy="kara", recall_tokens=8))
    check_recall(args, KaraConfig(policy="kara", recall_tokens=8, recall_tier_tokens=100, recall_kv="bits4"))
    with pytest.raises(KaraConfigError, match="--page-size 16"):
        check_recall(SimpleNamespace(**{**vars(args), "page_size": 16}),
                     KaraConfig(policy="kara", recall_tokens=8, recall_tier_tokens=100, recall_kv="bits4"))


# ------------------------------------------------------------------ through real SGLang
W, U = 32, 8
KARA = dict(kv_policy="kara", kara_window=W, kara_buffer=U, kara_keep_ratio=0.25, kara_chunk_size=2)
N_NEW = 4 * W + U + 20  # four compressions
R_TIER = 20  # a tier's recall buffer: below a window's evicted tokens (W - W/4 = 24)


def _greedy(n):
    return dict(temperature=0, max_new_tokens=n, ignore_eos=True)


def _prompts(seed, n):
    rng = random.Random(seed)
    return [[rng.randrange(10, 500) for _ in range(rng.randrange(6, 30))] for _ in range(n)]


@pytest.mark.sglang
# Once (6 minutes on the CPU per release, five engines): the aborts / opt-outs tests below run
# recall and the tier through the scheduler on every release.
@pytest.mark.newest_release
def test_recalling_every_evicted_token_gives_vanillas_tokens_and_plain_kara_does_not(tiny_model):
    """float32 (SGLang's attention and recall's agree to rounding): with R above every
    request's evicted count, each step attends to exactly the tokens vanilla does."""
    from support.engines import assert_pool_back_to_idle, last, make_engine, pool_state, use_cpu_sglang

    use_cpu_sglang()
    prompts = _prompts(5, 4)
    outputs = {}
    # A tier's recall buffer (R columns) must be smaller than a window's evicted tokens (24).
    tier = dict(KARA, kara_recall_tokens=R_TIER, kara_recall_kv="bits8")
    for name, extra in (("vanilla", {}), ("kara", KARA), ("recall", dict(KARA, kara_recall_tokens=10_000)),
                        ("tier", dict(tier, kara_recall_tier_tokens=50_000)),
                        ("tier-full", dict(tier, kara_recall_tier_tokens=8))):
        engine = make_engine(tiny_model, dtype="float32", **extra)
        try:
            outs = engine.generate(input_ids=prompts, sampling_params=_greedy(N_NEW))
            outputs[name] = [o["output_ids"] for o in outs]
            if name != "vanilla":
                assert all(last(o["meta_info"], "kv_tokens_evicted") > 0 for o in outs)
                state = pool_state(engine)
                assert state["compression_events"] == 4 * len(prompts), state
                assert state["recall_slots_held"] == 0, state  # every held slot went back
                if name.startswith("tier"):
                    # The tier frees evicted slots as plain Kara does, but for each request's
                    # buffer (R evicted tokens' slots, stored in the tier too); nothing is held
                    # at the end.
                    assert state["kv_slots_freed"] == state["tokens_evicted"] > 0, state
                    assert state["recall_tier_tokens_held"] == 0 and state["recall_buffers"] == 0, state
                    assert state["recall_tier_pages_held"] == 0, state
                    stored, fallback = state["recall_tier_tokens_stored"], state["recall_tier_fallback_tokens"]
                    assert (stored, fallback) == ((state["tokens_evicted"] + R_TIER * len(prompts), 0)
                                                  if name != "tier-full" else (0, state["tokens_evicted"])), state
            assert_pool_back_to_idle(engine)
        finally:
            engine.shutdown()
    assert outputs["recall"] == outputs["vanilla"]
    assert outputs["kara"] != outputs["vanilla"]  # eviction changes this model's tokens
    # A tier too small for any window is plain Kara. One that holds every evicted token at 8
    # bits, R of them recalled per layer and head through SGLang's attention, follows vanilla
    # further than plain Kara does (not token for token: R is below the evicted count, and
    # 8-bit rounding flips near-tied greedy tokens of this random model).
    assert outputs["tier-full"] == outputs["kara"]

    def agree(a, b):
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))

    assert sum(map(agree, outputs["tier"], outputs["vanilla"])) > sum(map(agree, outputs["kara"], outputs["vanilla"]))


@pytest.mark.sglang
@pytest.mark.newest_release  # the same scheduler path as one stage (the aborts test runs both on every release)
def test_every_page_kept_or_a_horizon_never_reached_gives_one_stages_tokens(tiny_model):
    """The server path of --kara-recall-pages (page bounds stored at each compression, pages
    ranked, then their tokens): with every page kept it selects what one stage selects, so a
    float32 model's tokens are the one-stage tier's, over two compressions per request. And a
    --kara-recall-horizon longer than every request's evicted tokens (48 here) drops nothing,
    so it too gives those tokens: on traces shorter than its horizon, a bounded tier answers as
    the whole tier does."""
    from support.engines import assert_pool_back_to_idle, make_engine, pool_state, use_cpu_sglang

    use_cpu_sglang()
    prompts = _prompts(11, 2)
    tier = dict(KARA, kara_recall_tokens=R_TIER, kara_recall_kv="bits8", kara_recall_tier_tokens=50_000)
    outputs = {}
    for name, extra in (("one", tier), ("two", dict(tier, kara_recall_pages=10_000)),
                        ("horizon", dict(tier, kara_recall_horizon=4 * W))):
        engine = make_engine(tiny_model, dtype="float32", **extra)
        try:
            outs = engine.generate(input_ids=prompts, sampling_params=_greedy(2 * W + U + 10))
            outputs[name] = [o["output_ids"] for o in outs]
            state = pool_state(engine)
            assert state["compression_events"] == 2 * len(prompts), state
            assert state["recall_buffer_fills"] > 0, state
            # The hit-rate counters: R picks per layer and KV head of every fill; the first
            # fill of each buffer writes them all, later ones only what changed.
            config = json.loads((Path(tiny_model) / "config.json").read_text())
            per_fill = config["num_hidden_layers"] * config["num_key_value_heads"] * R_TIER
            assert state["recall_buffer_picks"] == state["recall_buffer_fills"] * per_fill, state
            assert len(prompts) * per_fill <= state["recall_buffer_picks_written"] <= state["recall_buffer_picks"], state
            assert state["recall_tier_dropped_tokens"] == 0 and state["recall_tier_fallback_tokens"] == 0, state
            assert state["recall_tier_tokens_held"] == 0 and state["recall_tier_pages_held"] == 0, state
            assert_pool_back_to_idle(engine)
        finally:
            engine.shutdown()
    assert outputs["two"] == outputs["one"]
    assert outputs["horizon"] == outputs["one"]


@pytest.mark.sglang
@pytest.mark.newest_release  # the tier's scheduler path runs on every release in the aborts test
def test_a_horizon_drops_old_tier_tokens_through_the_scheduler_and_leaks_nothing(tiny_model):
    """--kara-recall-horizon W (32, below the 72 tokens three windows evict): the second and
    third compressions drop the request's oldest tier tokens (two pages, then the whole row),
    two-stage ranking keeps its page table through the shifts, and the recall buffers stay
    right: with KARA_DEBUG_CHECKS each eager step checks SGLang's attention over a buffer
    against recall's own kernel over the row's remaining tier tokens. Nothing stays held."""
    from support.engines import assert_pool_back_to_idle, make_engine, pool_state, use_cpu_sglang

    use_cpu_sglang()
    prompts = _prompts(23, 2)
    engine = make_engine(tiny_model, dtype="float32", kara_recall_tokens=R_TIER, kara_recall_kv="bits8",
                         kara_recall_tier_tokens=50_000, kara_recall_pages=2, kara_recall_horizon=W, **KARA)
    try:
        engine.generate(input_ids=prompts, sampling_params=_greedy(3 * W + U + 10))
        state = pool_state(engine)
        assert state["compression_events"] == 3 * len(prompts), state
        assert state["recall_buffer_fills"] > 0, state
        stored, dropped = state["recall_tier_tokens_stored"], state["recall_tier_dropped_tokens"]
        # 24 evicted tokens a window (the first one's buffer included), 32 at most kept: the
        # second window drops 16 (24 + 24 - 32, one page), the third all 32 (24 past the
        # horizon, rounded up to whole pages).
        assert stored == 3 * 24 * len(prompts) and state["recall_tier_fallback_tokens"] == 0, state
        assert dropped == (16 + 32) * len(prompts), state
        assert state["recall_tier_tokens_held"] == 0 and state["recall_tier_pages_held"] == 0, state
        assert state["recall_buffers"] == 0, state
        assert_pool_back_to_idle(engine)
    finally:
        engine.shutdown()


@pytest.mark.sglang
# The last case keeps one page of 16 tokens for R = 16: the pages' tokens without a second ranking
# (the token stage runs through the scheduler in
# test_every_page_kept_or_a_horizon_never_reached_gives_one_stages_tokens).
@pytest.mark.parametrize("digest, lag, kv, tier, pages", [("exact", 0, "exact", 0, 0), ("bits2", 1, "bits4", 0, 0),
                                                          ("exact", 0, "bits4", 48, 0), ("exact", 0, "bits4", 48, 1)])
def test_recall_with_aborts_and_opt_outs_leaks_nothing(tiny_model, digest, lag, kv, tier, pages):
    import asyncio

    from support.engines import assert_pool_back_to_idle, make_engine, pool_state, tally_outcome, use_cpu_sglang

    use_cpu_sglang()
    engine = make_engine(tiny_model, max_total_tokens=3000, kara_recall_tokens=16 if pages else 4, kara_recall_digest=digest,
                         kara_recall_lag=lag, kara_recall_kv=kv, kara_recall_tier_tokens=tier,
                         kara_recall_pages=pages, **KARA)
    rng = random.Random(17 + lag)
    results = {"done": 0, "aborted": 0, "evicted": 0}

    async def one(i, prompt):
        params = _greedy(rng.choice([5, 45, N_NEW]))
        if i % 5 == 0:
            params["custom_params"] = {"kv_policy": "none"}
        rid = f"recall-{digest}-{i}"
        task = asyncio.ensure_future(engine.async_generate(input_ids=prompt, sampling_params=params, rid=rid))
        if i % 4 == 1:
            await asyncio.sleep(0.3 + rng.random())
            engine.tokenizer_manager.abort_request(rid=rid)
        await tally_outcome(task, results)

    async def run():
        await asyncio.gather(*(one(i, p) for i, p in enumerate(_prompts(lag, 16))))

    try:
        engine.loop.run_until_complete(run())
        assert results["done"] + results["aborted"] == 16 and results["evicted"] > 0, results
        state = pool_state(engine)
        assert state["recall_slots_held"] == 0, state
        if tier:  # a tier smaller than the evicted tokens: some windows stored, some fell back
            assert state["recall_tier_tokens_held"] == 0 and state["recall_tier_pages_held"] == 0, state
            assert state["recall_tier_tokens_stored"] > 0 and state["recall_tier_fallback_tokens"] > 0, state
        assert_pool_back_to_idle(engine)
    finally:
        engine.shutdown()


@pytest.mark.sglang
@pytest.mark.slow
def test_tier_under_tensor_parallelism_fills_on_every_rank_and_leaks_nothing(tiny_model):
    """tp_size=2 (two ranks, gloo): each rank's tier holds its own KV heads and selects per KV
    head; with Kara's debug checks on, every compression compares the ranks' keep sets, freed
    slots, tier rows and buffers, and every step compares each rank's attention over its
    buffer with recall's own kernel (a divergence kills the scheduler)."""
    from support.engines import assert_pool_back_to_idle, make_engine, pool_state, use_cpu_sglang

    use_cpu_sglang()
    prompts = _prompts(11, 4)
    engine = make_engine(tiny_model, dtype="float32", tp_size=2, kara_recall_tokens=R_TIER, kara_recall_kv="bits8",
                         kara_recall_tier_tokens=50_000, **KARA)
    try:
        outs = engine.generate(input_ids=prompts, sampling_params=_greedy(N_NEW))
        assert all(len(o["output_ids"]) == N_NEW for o in outs)
        state = pool_state(engine)  # rank 0 answers for the TP group
        assert state["tp_size"] == 2 and state["compression_events"] == 4 * len(prompts), state
        assert state["recall_tier_tokens_stored"] == state["tokens_evicted"] + R_TIER * len(prompts), state
        assert state["recall_buffer_fills"] > 0, state
        assert state["recall_tier_tokens_held"] == 0 and state["recall_buffers"] == 0, state
        digests = state["tp_state_digests"]
        assert len(digests) == 2 and digests[0] == digests[1], digests
        assert_pool_back_to_idle(engine)
    finally:
        engine.shutdown()
