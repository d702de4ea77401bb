"""Window bookkeeping: when each policy compresses, which region, and what stays final."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kara_sglang.config import KaraConfig
from kara_sglang.policies import make_policy
from kara_sglang.window import WindowState


def run(policy, state, steps):
    tasks = []
    for _ in range(steps):
        state.on_decode()
        task = policy.plan(state)
        if task is not None:
            tasks.append((state.decoded, task))
            state.apply(task, policy.tail_consumed(task))
        assert policy.plan(state) is None  # one compression clears what was due
    return tasks


@pytest.mark.parametrize("name", ["kara", "cask"])  # cask runs on Kara's windows
@settings(max_examples=150, deadline=None)
@given(
    window=st.integers(4, 64), buffer_frac=st.floats(0.05, 0.9), ratio=st.floats(0.05, 1.0),
    core=st.floats(0.0, 1.0), prompt=st.integers(0, 50), steps=st.integers(0, 600),
)
def test_window_policies_compress_each_window_once_on_schedule(name, window, buffer_frac, ratio, core,
                                                                prompt, steps):
    buffer = max(1, min(window - 1, int(window * buffer_frac)))
    extra = {"core_fraction": core} if name == "cask" else {}
    cfg = KaraConfig(policy=name, window=window, buffer=buffer, keep_ratio=ratio, chunk_size=1, **extra)
    policy = make_policy(cfg)
    assert policy.name == name and policy.query_ring == window + buffer
    state = WindowState(prompt_len=prompt)
    tasks = run(policy, state, steps)
    keep = cfg.window_budget
    # Fires at decode step W + U, then every W steps.
    assert [d for d, _ in tasks] == list(range(window + buffer, steps + 1, window))
    for i, (_, task) in enumerate(tasks):
        # The prompt is never touched; window i starts right after i compressed windows.
        assert task.kv_start == prompt + i * keep >= prompt
        assert (task.n_keys, task.keep, task.n_suffix) == (window, keep, buffer)
        assert task.n_queries == window + buffer
    assert state.tail < window + buffer
    assert state.kv_len == prompt + steps - len(tasks) * (window - keep)
    assert state.evicted == len(tasks) * (window - keep)
    assert state.next_position == prompt + steps


@settings(max_examples=100, deadline=None)
@given(budget=st.integers(8, 200), buffer=st.integers(1, 7), prompt=st.integers(0, 20),
       steps=st.integers(0, 800))
def test_threshold_keeps_decode_cache_between_budget_and_budget_plus_u(budget, buffer, prompt, steps):
    cfg = KaraConfig(policy="threshold", budget=budget, buffer=buffer, window=256)
    policy = make_policy(cfg)
    state = WindowState(prompt_len=prompt)
    tasks = run(policy, state, steps)
    for _, task in tasks:
        assert task.kv_start == prompt
        assert task.n_suffix == buffer == task.n_queries
        assert task.keep == budget - buffer
    assert state.decode_kv < budget + buffer
    if steps >= budget + buffer:
        assert state.decode_kv >= budget
        # Fires every U steps once full: the recurring cost of threshold policies.
        fired = [d for d, _ in tasks]
        assert all(b - a == buffer for a, b in zip(fired, fired[1:]))


def test_streaming_keeps_sink_and_recent():
    cfg = KaraConfig(policy="streaming", budget=10, sink=2, buffer=4, window=32)
    policy = make_policy(cfg)
    state = WindowState(prompt_len=3)
    tasks = run(policy, state, 14)
    assert len(tasks) == 1
    task = tasks[0][1]
    keep = policy.select(None, task, 1, "cpu")
    assert keep.tolist() == [[0, 1, 6, 7, 8, 9, 10, 11, 12, 13]]


def test_none_never_compresses():
    policy = make_policy(KaraConfig(policy="none"))
    state = WindowState(prompt_len=5)
    assert run(policy, state, 5000) == []
    assert state.kv_len == 5005


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(["kara", "threshold", "streaming"]), prompt=st.integers(0, 30),
       steps=st.integers(0, 700))
def test_steps_until_due_never_skips_a_due_compression(name, prompt, steps):
    # The adapter only calls plan() when this countdown runs out, so it must never overshoot.
    extra = {"kara": {}, "threshold": {"budget": 40}, "streaming": {"budget": 40}}[name]
    policy = make_policy(KaraConfig(policy=name, window=32, buffer=8, chunk_size=2, **extra))
    state = WindowState(prompt_len=prompt)
    countdown = policy.steps_until_due(state)
    for _ in range(steps):
        state.on_decode()
        countdown -= 1
        task = policy.plan(state)
        if task is not None:
            assert countdown == 0
            state.apply(task, policy.tail_consumed(task))
        if countdown == 0 or task is not None:
            countdown = policy.steps_until_due(state)
        assert countdown >= 1
