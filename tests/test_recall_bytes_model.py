"""benchmarks/reasoning/recall_bytes_model.py: a GPU tier bounded to a horizon (no SGLang, no GPU)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "reasoning"))

import recall_bytes_model as m  # noqa: E402


def test_a_horizon_bounds_the_tier_and_costs_between_plain_kara_and_the_whole_tier():
    steps = m.resident_profile(1024, 4096, 0.25)
    evicted = max(e for _, e in steps)
    plain_peak = max(r for r, _ in steps)
    whole = m.gpu_tier(steps, 4, 256)
    assert m.gpu_tier(steps, 4, 256, horizon=evicted) == whole  # a horizon past every evicted token binds nothing
    peaks = [m.gpu_tier(steps, 4, 256, horizon=h)[0] for h in (256, 1024, 2048)]
    assert plain_peak < peaks[0] < peaks[1] < peaks[2] < whole[0]
    # At most H evicted tokens at 5/16 of bf16, plus the R-slot bf16 recall buffer, on top of the resident set.
    assert plain_peak + 256 < peaks[1] <= plain_peak + 256 + 1024 * 5 / 16
    names = [row[0] for row in m.design_rows(steps, 1024, 4096, 256, 85, 55.0, horizons=(1024,))]
    assert "GPU tier, 4-bit KV, last 1,024 evicted" in names


def test_the_recall_buffer_is_read_in_bf16_and_its_new_picks_are_rewritten():
    steps = m.resident_profile(1024, 4096, 0.25)
    compressed = [e for _, e in steps if e]
    assert compressed and len(compressed) < len(steps)  # no buffer before the first compression
    plain_reads = sum(r for r, _ in steps) / len(steps)
    _, no_churn = m.gpu_tier(steps, 4, 256, horizon=1024, churn=0)
    _, full_churn = m.gpu_tier(steps, 4, 256, horizon=1024, churn=256)
    # Each step after the first compression reads the whole buffer in bf16 and at least the
    # tier's keys; every pick rewritten adds its 4-bit read and its bf16 write.
    assert no_churn >= plain_reads + 256 * len(compressed) / len(steps)
    rewritten = sum(min(256, e) for e in compressed) / len(steps)
    assert abs((full_churn - no_churn) - rewritten * (5 / 16 + 1)) < 1e-6
