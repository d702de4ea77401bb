"""benchmarks/reasoning/horizon_reach.py: which ledger reads a recall horizon drops (no model, no GPU)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "reasoning"))

import horizon_reach as m  # noqa: E402

W, U, E = 512, 64, 384  # keep 25%: 384 evicted tokens a window


@pytest.mark.parametrize("t, s, horizon, where", [
    (600, 100, 1024, "within"),   # one window compressed, the source's
    (600, 560, 1024, "tail"),     # the source's window not compressed yet
    (3 * W + U, 10, 768, "past"),    # three windows evicted since: 1,152 - 384 >= 768
    (3 * W + U, 10, 1152, "within"),
    (3 * W + U, 10, 1000, "partly"),  # 768 < 1,000 < 1,152: some of its window dropped
    (3 * W + U, 2 * W + 5, 100, "partly"),  # the last window evicted 384: the horizon keeps its last 100
])
def test_a_read_is_placed_by_the_tokens_evicted_after_its_sources_window(t, s, horizon, where):
    assert m.reach(t, s, W, U, E, horizon) == where


def test_a_longer_horizon_never_drops_more_reads():
    row = m.measure("verbose", 20, m.EVAL_SEED0, W, U, 0.25, (1024, 2048, 4096))
    past = [row["by_horizon"][str(h)]["all"]["past"] for h in (1024, 2048, 4096)]
    assert past[0] >= past[1] >= past[2] and past[0] > 0
    assert all(sum(c["all"].values()) == row["reads"] for c in row["by_horizon"].values())
