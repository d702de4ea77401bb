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


def test_the_page_only_tier_lane_differs_from_the_two_stage_one_in_its_pages_alone():
    assert _recall(_lane("tier-p16-h4096")) == {**_recall(_lane("tier-p64-h4096")), "pages": 16}


def test_an_emulation_row_keeps_its_digest_and_names_no_tier():
    assert _recall(_lane("recall-bits2-kv4")) == {"tokens": 256, "lag": 0, "digest": "bits2", "kv": "bits4"}


def test_what_the_server_reported_wins_over_the_launch_flags():
    recall = _recall(_lane("tier-p64-h4096"), {"recall_pages": 16, "recall_horizon": 2048})
    assert (recall["pages"], recall["horizon"]) == (16, 2048)


def test_a_plain_kara_row_has_no_recall():
    assert _recall(_lane("kara-w512-u64")) is None


def _records(folder: Path, lane: str, settings: dict, first: int = 0, n: int = 4, gz: bool = False) -> None:
    """settings: setting -> {relative index: correct}; one records file per setting."""
    import gzip
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plan.json").write_text(json.dumps({"n": n, "first": first}))
    for k, (setting, answers) in enumerate(settings.items()):
        lines = "".join(json.dumps({"setting": setting, "index": i, "correct": c}) + "\n" for i, c in answers.items())
        path = folder / f"records-{lane}-dense-{k}.jsonl"
        if gz:
            with gzip.open(f"{path}.gz", "wt") as f:
                f.write(lines)
        else:
            path.write_text(lines)


def test_a_lane_run_in_parts_pairs_each_problem_with_its_own_full_kv_answer(tmp_path):
    import paired_lanes

    full = {0: True, 1: True, 2: False, 3: True}
    kara = {0: True, 1: True, 2: False, 3: False}
    _records(tmp_path / "ref", "kara-w512-u64", {"vanilla": full, "kara:keep=0.25": kara}, gz=True)
    # Problems 0-1 and (cut short: problem 3 unfinished) 2 of 2-3; indices are relative to each part.
    _records(tmp_path / "a", "tier", {"kara:keep=0.25": {0: True, 1: False}}, first=0, n=2)
    _records(tmp_path / "b", "tier", {"kara:keep=0.25": {0: True}}, first=2, n=2)
    rows = paired_lanes.pair([tmp_path / "ref"], "tier", [tmp_path / "a", tmp_path / "b"], styles=("dense",))
    by_part = {r["part"]: r for r in rows}
    assert by_part["b"]["problems"] == [2, 3] and by_part["b"]["finished"] == 1
    assert (by_part["b"]["full_kv_right"], by_part["b"]["plain_kara_right"]) == (0, 0)  # problem 2's, not 0's
    assert by_part["b"]["only_this_right"] == 1
    both = by_part["all parts"]
    assert (both["problems"], both["finished"], both["right"], both["full_kv_right"]) == ([0, 3], 3, 2, 2)
    assert (both["only_full_kv_right"], both["only_this_right"], both["plain_kara_right"]) == (1, 1, 2)


def test_a_kara_lane_run_in_parts_is_one_reference(tmp_path):
    import paired_lanes

    # The Kara lane in two parts (problems 0-1, 2-3), the tier lane in one over 0-3.
    _records(tmp_path / "ref0", "kara-w512-u64", {"vanilla": {0: True, 1: False}, "kara:keep=0.25": {0: False, 1: False}},
             first=0, n=2)
    _records(tmp_path / "ref2", "kara-w512-u64", {"vanilla": {0: True, 1: True}, "kara:keep=0.25": {0: True, 1: False}},
             first=2, n=2)
    _records(tmp_path / "tier", "tier", {"kara:keep=0.25": {0: True, 1: True, 2: False, 3: True}}, first=0, n=4)
    (row,) = paired_lanes.pair([tmp_path / "ref0", tmp_path / "ref2"], "tier", [tmp_path / "tier"], styles=("dense",))
    assert (row["finished"], row["right"], row["full_kv_right"], row["plain_kara_right"]) == (4, 3, 3, 1)
    # Problem 1: only the tier right; problem 2 (the second part's index 0): only full KV right.
    assert (row["only_full_kv_right"], row["only_this_right"]) == (1, 1)


def test_a_paired_lane_becomes_accuracy_rows_with_its_own_full_kv(tmp_path):
    import json

    import paired_lanes

    _records(tmp_path / "ref", "kara-w512-u64", {"vanilla": {0: True, 1: True, 2: False, 3: True},
                                                 "kara:keep=0.25": {0: False, 1: False, 2: False, 3: False}})
    tier_args = ["--kv-policy", "kara", "--kara-recall-tokens", "256", "--kara-recall-kv", "bits4",
                 "--kara-recall-tier-tokens", "4096", "--kara-recall-pages", "16", "--kara-recall-horizon", "4096"]
    for name, first, answers, kv in (("a", 0, {0: True, 1: True}, 0.5), ("b", 2, {0: True, 1: False}, 0.7)):
        _records(tmp_path / name, "tier", {"kara:keep=0.25": answers}, first=first, n=2)
        (tmp_path / name / "plan.json").write_text(json.dumps(
            {"n": 2, "first": first, "sglang_version": "0.5.17", "lanes": [{"name": "tier", "args": tier_args}]}))
        (tmp_path / name / "rows-tier-dense-0.json").write_text(json.dumps({"rows": [{
            "setting": "kara:keep=0.25", "custom_params": {"kara_keep_ratio": 0.25}, "n": 2, "correct": 1,
            "accuracy": 0.5, "ci95": [0, 1], "kv_mean_fraction": kv, "kv_mean_tokens": 100 * kv,
            "output_tokens_mean": 1000, "errors": 0}]}))
    parts = [tmp_path / "a", tmp_path / "b"]
    pairs = paired_lanes.pair([tmp_path / "ref"], "tier", parts, styles=("dense",))
    (row,) = paired_lanes.accuracy_rows(pairs, "tier", parts, "GPU X", "raw-x")
    assert (row["n"], row["correct"], row["accuracy"], row["full_kv_accuracy"]) == (4, 3, 0.75, 0.75)
    assert row["keep_ratio"] == 0.25 and abs(row["kv_mean_fraction"] - 0.6) < 1e-9
    assert row["recall"]["pages"] == 16 and row["recall"]["tier_tokens"] == 4096
    assert row["paired"]["only_full_kv_right"] == 1 and row["paired"]["only_this_right"] == 1
    # Merging replaces the same source's row instead of adding a second one.
    out = tmp_path / "acc.json"
    out.write_text(json.dumps([{"style": "dense", "setting": "vanilla", "policy": "full"}]))
    paired_lanes.merge_rows(out, [row])
    paired_lanes.merge_rows(out, [dict(row, correct=2)])
    rows = json.loads(out.read_text())
    assert len(rows) == 2 and rows[1]["correct"] == 2


def test_a_setting_cut_short_gets_no_accuracy_row(tmp_path):
    import paired_lanes

    _records(tmp_path / "ref", "kara-w512-u64", {"vanilla": {0: True, 1: True}}, n=2)
    _records(tmp_path / "a", "tier", {"kara:keep=0.25": {0: True}}, n=2)
    pairs = paired_lanes.pair([tmp_path / "ref"], "tier", [tmp_path / "a"], styles=("dense",))
    assert paired_lanes.accuracy_rows(pairs, "tier", [tmp_path / "a"], "GPU X", "raw-x") == []


def test_a_grid_report_keeps_the_rows_other_runs_added(tmp_path):
    import json

    import report

    out = tmp_path / "acc.json"
    assert report.rows_from_other_runs(out) == []
    out.write_text(json.dumps([{"setting": "vanilla"}, {"setting": "kara:keep=0.25", "source": "raw-x"}]))
    assert report.rows_from_other_runs(out) == [{"setting": "kara:keep=0.25", "source": "raw-x"}]
