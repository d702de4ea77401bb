"""CASK: the merge kernel, the core/scratch selection rule, whole compressions, real SGLang."""

import pytest
import torch

from kara_kernels import merge_kv, merge_kv_reference


def random_merges(gen, n_merges, max_src, num_slots):
    """Disjoint groups of slots; each merge writes into the slot of one of its members."""
    perm = torch.randperm(num_slots, generator=gen)
    src = torch.zeros(n_merges, max_src, dtype=torch.int64)
    weights = torch.zeros(n_merges, max_src, dtype=torch.float32)
    n_src = torch.zeros(n_merges, dtype=torch.int32)
    dst = torch.zeros(n_merges, dtype=torch.int64)
    used = 0
    for m in range(n_merges):
        n = int(torch.randint(0 if m == 0 else 1, max_src + 1, (1,), generator=gen))
        members = perm[used: used + max(n, 1)]
        used += max(n, 1)
        src[m, :n] = members[:n]
        src[m, n:] = perm[-1]  # padding: never read
        w = torch.rand(n, generator=gen) + 0.05
        weights[m, :n] = w / w.sum()
        weights[m, n:] = float("nan")  # padding weights are never read either
        n_src[m] = n
        dst[m] = members[int(torch.randint(0, max(n, 1), (1,), generator=gen))]
    return dst, src, weights, n_src


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads, head_dim", [(2, 16), (3, 8), (1, 64)])
def test_merge_kv_matches_float64_reference(dtype, heads, head_dim, device):
    seed = 22
    gen = torch.Generator().manual_seed(seed)
    n_merges, max_src, layers = 7, 5, 3
    num_slots = n_merges * max_src + 9
    buffers = [torch.randn(num_slots, heads, head_dim, generator=gen).to(dtype).to(device)
               for _ in range(2 * layers)]
    expected = [b.clone().cpu() for b in buffers]
    dst, src, weights, n_src = random_merges(gen, n_merges, max_src, num_slots)
    merge_kv_reference(expected, dst, src, weights, n_src)
    merge_kv(buffers, dst.to(device), src.to(device), weights.to(device), n_src.to(device), block=32)
    written = {int(dst[m]) for m in range(n_merges) if int(n_src[m]) > 0}
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for got, want in zip(buffers, expected):
        got = got.cpu()
        others = [s for s in range(num_slots) if s not in written]
        assert torch.equal(got[others], want[others]), f"seed {seed}"  # every other row untouched
        rows = sorted(written)
        assert torch.allclose(got[rows].double(), want[rows].double(), rtol=tol, atol=tol), f"seed {seed}"


# ----------------------------------------------------------------------------- the rule
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kara_sglang.config import KaraConfig, KaraConfigError  # noqa: E402
from kara_sglang.policies import make_policy  # noqa: E402
from kara_sglang.window import WindowState  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(window=st.integers(2, 80), ratio=st.floats(0.01, 1.0), core=st.floats(0.0, 1.0),
       n=st.integers(1, 3), seed=st.integers(0, 2**31 - 1), ties=st.booleans())
def test_cask_selection_core_exact_scratch_merged_in_runs(window, ratio, core, n, seed, ties):
    cfg = KaraConfig(policy="cask", window=window, buffer=1, keep_ratio=ratio, core_fraction=core)
    policy = make_policy(cfg)
    task = policy.plan(WindowState(prompt_len=3, decode_kv=window + 1, tail=window + 1, decoded=window + 1))
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, window, generator=gen) * 5
    if ties:
        scores = scores.round()  # many equal scores, zeros included
    keep, plan = policy.select_and_merge(scores, task, n, "cpu")
    budget = cfg.window_budget
    core_n = round(core * budget)
    assert keep.shape == (n, budget)  # budget respected exactly
    assert torch.equal(keep, policy.select(scores, task, n, "cpu"))
    for b in range(n):
        k = keep[b].tolist()
        assert k == sorted(set(k)) and 0 <= k[0] and k[-1] < window
        if plan is None:
            assert core_n == budget
            assert sorted(scores[b, k].tolist(), reverse=True) == sorted(scores[b].tolist(), reverse=True)[:budget]
            continue
        sizes = plan.sizes.tolist()
        assert len(sizes) == budget - core_n and sum(sizes) == window - core_n
        assert max(sizes) - min(sizes) <= 1
        targets = plan.targets[b].tolist()
        runs = [plan.members[b, g, : sizes[g]].tolist() for g in range(len(sizes))]
        core_set = set(k) - set(targets)
        assert len(core_set) == core_n and set(targets) <= set(k)
        # The core is the top-C scores; the runs partition the rest into consecutive non-core runs.
        rest = [p for p in range(window) if p not in core_set]
        assert sum(runs, []) == rest
        if core_set:
            assert min(scores[b, sorted(core_set)].tolist()) >= max(scores[b, rest].tolist())
        for g, members in enumerate(runs):
            s = scores[b, members].double()
            assert targets[g] in members and scores[b, targets[g]] == s.max()
            w = plan.weights[b, g, : sizes[g]].double()
            want = s / s.sum() if s.sum() > 0 else torch.full_like(s, 1 / len(members))
            assert torch.allclose(w, want, atol=1e-6)
            assert float(plan.weights[b, g, sizes[g]:].abs().sum()) == 0


def test_core_fraction_is_validated_with_one_line_naming_the_flag():
    for bad in (-0.1, 1.5, "x", None):
        with pytest.raises(KaraConfigError, match="^--kara-core-fraction: ") as err:
            KaraConfig(policy="cask", core_fraction=bad)
        assert "\n" not in str(err.value)
    with pytest.raises(KaraConfigError, match="^--kara-window"):
        KaraConfig(policy="cask", window=2048)
    with pytest.raises(KaraConfigError, match="^--kara-budget"):
        KaraConfig(policy="cask", window=32, buffer=8, budget=40)
    from kara_sglang.flags import request_overrides

    server = KaraConfig(policy="cask")
    assert request_overrides(server, {"kara_core_fraction": 0.25}).core_fraction == 0.25
    with pytest.raises(KaraConfigError, match="kara-core-fraction"):
        request_overrides(server, {"kara_core_fraction": 2})


# ------------------------------------------------------------------ whole compressions
from kara_sglang.synthetic import SyntheticDecode  # noqa: E402


class RecordingDecode(SyntheticDecode):
    """The toy pool, recording the keep sets and merges the compressor applied."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls = []
        original = self.policy.select_and_merge

        def recording(scores, task, n_windows, device):
            keep, plan = original(scores, task, n_windows, device)
            self.calls.append((keep.cpu(), plan))
            return keep, plan

        self.policy.select_and_merge = recording

    def _kept_of(self, item):
        # Merged rows carry averaged position marks, so read the keep set from the record.
        return self.keep_of[item.pool_row]


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_compression_merges_scratch_and_leaks_nothing(page_size, dtype, device):
    cfg = KaraConfig(policy="cask", window=24, buffer=6, keep_ratio=0.25, core_fraction=0.5,
                     num_vote_layers=2)
    seed = 23
    prompts = [int(x) for x in torch.randint(0, 40, (3,), generator=torch.Generator().manual_seed(seed))]
    sim = RecordingDecode(cfg, prompts, num_layers=3, page_size=page_size, seed=seed, dtype=dtype,
                          device=device)
    buffers = sim.k + sim.v
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    events = merged_rows = 0
    exact = {}
    for _ in range(100):
        sim.decode()
        due = sim.due()
        if not due:
            continue
        before = [b.clone().cpu().double() for b in buffers]
        old_rows = {it.pool_row: sim.req_to_token[it.pool_row, : sim.requests[it.pool_row].state.kv_len]
                    .long().cpu().clone() for it in due}
        sim.calls.clear()
        sim.keep_of = {}
        # The keep sets are recorded as the compressor runs; _kept_of reads them afterwards.
        real_run = sim.compressor.run

        def run_and_index(items, policy=None, exact_prefix=None):
            freed = real_run(items, policy, exact_prefix)
            (keep, _), = sim.calls  # one shape group: rows follow the due order
            for b, it in enumerate(items):
                sim.keep_of[it.pool_row] = keep[b].tolist()
            return freed

        sim.compressor.run = run_and_index
        sim.compress(due)
        sim.compressor.run = real_run
        (keep, plan), = sim.calls
        events += len(due)
        for b, it in enumerate(due):
            t, old = it.task, old_rows[it.pool_row]
            new = sim.req_to_token[it.pool_row, : t.new_end].long().cpu()
            targets = plan.targets[b].tolist()
            expected_rows = []
            for p in range(t.kv_start):  # prompt and earlier (final) windows: untouched
                expected_rows.append([buf[old[p]] for buf in before])
            for p in keep[b].tolist():
                if p in targets:
                    g = targets.index(p)
                    size = int(plan.sizes[g])
                    members = old[t.kv_start + plan.members[b, g, :size].cpu()]
                    w = plan.weights[b, g, :size].cpu().double()
                    expected_rows.append([(w.view(-1, 1, 1) * buf[members]).sum(0) for buf in before])
                    merged_rows += 1
                else:  # core token: bit-exact
                    expected_rows.append([buf[old[t.kv_start + p]] for buf in before])
            for p in range(t.kv_start + t.n_keys, t.old_end):  # the buffer U slides left, exact
                expected_rows.append([buf[old[p]] for buf in before])
            assert len(expected_rows) == t.new_end == len(new), f"seed {seed}"
            # Exact prefix for the radix tree: stops at the first token moved or merged into.
            leading = next((j for j, p in enumerate(keep[b].tolist()) if p != j or p in targets),
                           t.keep)
            exact[it.pool_row] = min(exact.get(it.pool_row, t.old_end), t.kv_start + leading)
            assert int(sim.exact_prefix[it.pool_row]) == exact[it.pool_row], f"seed {seed}"
            for i, rows in enumerate(expected_rows):
                for buf, want in zip(buffers, rows):
                    got = buf[new[i]].cpu().double()
                    if t.kv_start <= i < t.kv_start + t.keep and keep[b, i - t.kv_start].item() in targets:
                        assert torch.allclose(got, want, rtol=tol, atol=tol), f"seed {seed}"
                    else:
                        assert torch.equal(got, want), f"seed {seed}"
        # No leak, no double free (the toy allocator raises): every page in use is owned.
        assert sim.owned_pages() == sim.alloc.in_use, f"seed {seed}"
    assert events >= 6 and merged_rows > 0, f"seed {seed}"
    sim.finish_all()
    assert sim.alloc.free_slots == sim.idle_free and not sim.alloc.in_use, f"seed {seed}"


# ------------------------------------------------------------------------ real SGLang
SGL_W, SGL_U = 32, 8
SYSTEM = [int(x) for x in torch.randint(10, 500, (48,), generator=torch.Generator().manual_seed(7))]


@pytest.mark.sglang
@pytest.mark.newest_release  # the scheduler path is Kara's, run on every release
def test_cask_through_the_real_sglang_scheduler(tiny_model):
    from support.engines import assert_pool_back_to_idle, flush, last, make_engine, shared_engine, use_cpu_sglang

    use_cpu_sglang()
    prompts = ["the first step is", "answer equals seven plus two minus", "they were called people"]
    n = 2 * SGL_W + SGL_U + 5
    greedy = dict(temperature=0, max_new_tokens=n, ignore_eos=True)
    short = dict(greedy, max_new_tokens=10)

    def conversation(engine):
        flush(engine)
        first = engine.generate(input_ids=SYSTEM + [11, 12], sampling_params=greedy)
        shared = engine.generate(input_ids=SYSTEM + [13, 14, 15], sampling_params=short)
        return first, shared["meta_info"]["cached_tokens"]

    engine = shared_engine(tiny_model)  # vanilla: the session's engine of SGLang's defaults
    base = engine.generate(prompts, greedy)
    _, base_shared = conversation(engine)

    cfg = KaraConfig(policy="cask", window=SGL_W, buffer=SGL_U, keep_ratio=0.25, core_fraction=0.5)
    engine = make_engine(tiny_model, kv_policy="cask", kara_window=SGL_W, kara_buffer=SGL_U,
                         kara_keep_ratio=0.25, kara_core_fraction=0.5)
    try:
        ours = engine.generate(prompts, greedy)
        for b, o in zip(base, ours):
            meta = o["meta_info"]
            assert meta["completion_tokens"] == n
            # Cask's own bookkeeping: decode KV entry W + U triggers, then every W.
            policy, state = make_policy(cfg), WindowState(prompt_len=meta["prompt_tokens"])
            for _ in range(n - 2):
                state.on_decode()
                task = policy.plan(state)
                if task is not None:
                    state.apply(task, policy.tail_consumed(task))
            assert last(meta, "kv_tokens_evicted") == state.evicted == 2 * (SGL_W - cfg.window_budget)
            assert last(meta, "kv_tokens_kept") == state.kv_len + 1
            # Identical to vanilla until the first compression (after output token W + U + 1).
            first = SGL_W + SGL_U + 1
            assert o["output_ids"][:first] == b["output_ids"][:first]
        long_turn, shared = conversation(engine)
        assert last(long_turn["meta_info"], "kv_tokens_evicted") > 0
        # The compressed answer stays out of the tree; the shared system prompt is still hit.
        assert shared == base_shared >= len(SYSTEM)
        assert_pool_back_to_idle(engine)
    finally:
        engine.shutdown()
