"""The accuracy grid's rows name what their server ran (benchmarks/reasoning/report.py over the
lanes of run_grid.py): a GPU-tier row its tier, pages and horizon, ranked by the tier's own
codes; an emulation row its digest and no tier; what a server reported wins over its flags."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "reasoning"))
import report  # noqa: E402
import run_grid  # noqa: E402

ROW = dict(setting="kara:keep=0.25", custom_params={"kara_keep_ratio": 0.25}, ci95=[0.8, 0.95], n=20,
           correct=18, accuracy=0.9, kv_mean_fraction=0.3, kv_mean_tokens=700.0, output_tokens_mean=2300.0,
           errors=0)


def _lane(name: str) -> dict:
    plan, _ = run_grid.lanes({"dense": {"lengths": [2000, 2600, 3100]}}, gpus=1)
    return next(lane for lane in plan if lane["name"] == name)


def _recall(lane: dict, reported=None) -> dict:
    return report.row_for(report.lane_config(lane, reported), "dense", ROW, "cpu", "0.5.23")["recall"]


def test_a_tier_row_names_its_tier_and_ranks_by_its_codes():
    assert _recall(_lane("tier-p64-h4096")) == {"tokens": 256, "lag": 0, "digest": "bits4", "kv": "bits4",
                                                "tier_tokens": 256 * 4096, "pages": 64, "horizon": 4096}


def test_an_emulation_row_keeps_its_digest_and_names_no_tier():
    assert _recall(_lane("recall-bits2-kv4")) == {"tokens": 256, "lag": 0, "digest": "bits2", "kv": "bits4"}


def test_what_the_server_reported_wins_over_the_launch_flags():
    recall = _recall(_lane("tier-p64-h4096"), {"recall_pages": 16, "recall_horizon": 2048})
    assert (recall["pages"], recall["horizon"]) == (16, 2048)


def test_a_plain_kara_row_has_no_recall():
    assert _recall(_lane("kara-w512-u64")) is None
