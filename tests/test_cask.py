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
    gen = torch.Generator().manual_seed(torch.seed())
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
        assert torch.equal(got[others], want[others])  # every other row untouched
        rows = sorted(written)
        assert torch.allclose(got[rows].double(), want[rows].double(), rtol=tol, atol=tol)


# ----------------------------------------------------------------------------- the rule
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kara_sglang.config import KaraConfig, KaraConfigError  # noqa: E402
from kara_sglang.policies import make_policy  # noqa: E402
from kara_sglang.policies.cask import CaskPolicy  # noqa: E402
from kara_sglang.window import WindowState  # noqa: E402
from test_policies import run  # noqa: E402


@settings(max_examples=150, deadline=None)
@given(window=st.integers(4, 64), buffer_frac=st.floats(0.05, 0.9), ratio=st.floats(0.05, 1.0),
       core=st.floats(0.0, 1.0), prompt=st.integers(0, 50), steps=st.integers(0, 600))
def test_cask_windows_follow_kara_schedule_and_stay_final(window, buffer_frac, ratio, core, prompt, steps):
    buffer = max(1, min(window - 1, int(window * buffer_frac)))
    cfg = KaraConfig(policy="cask", window=window, buffer=buffer, keep_ratio=ratio, core_fraction=core)
    policy = make_policy(cfg)
    assert isinstance(policy, CaskPolicy) and policy.query_ring == window + buffer
    state = WindowState(prompt_len=prompt)
    tasks = run(policy, state, steps)
    keep = cfg.window_budget
    assert [d for d, _ in tasks] == list(range(window + buffer, steps + 1, window))
    for i, (_, task) in enumerate(tasks):
        # Prompt untouched; window i starts right after the i final compressed windows.
        assert task.kv_start == prompt + i * keep >= prompt
        assert (task.n_keys, task.keep, task.n_suffix) == (window, keep, buffer)
    assert state.kv_len == prompt + steps - len(tasks) * (window - keep)
    assert state.next_position == prompt + steps


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
