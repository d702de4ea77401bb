"""Accuracy from a grid cut short: the per-request records of settings that had not ended.

    python benchmarks/reasoning/report_partial.py DIR [DIR ...]

DIR holds ``records-<lane>-<style>-<k>.jsonl`` (run_reasoning.sh's grid-partial-records.tar.gz,
unpacked) and ``plan.json``. kara-accuracy writes a record when its request ends, so a setting
cut short has the requests that ended first: the short replies, and none of the longest. Nothing
is extrapolated: each row gives the finished count, the right ones among them, the bounds over
all n problems (every unfinished one wrong / right), and the pairing with full KV of the same
grid (the ``vanilla`` setting of the Kara lane, same trained model) on the finished problems.
The full-KV reply length of the unfinished problems says whether they are the long ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paired import mcnemar_exact  # noqa: E402


def read(path: Path) -> dict:
    """Problem index -> record (the last one if a request was written twice)."""
    return {r["index"]: r for r in map(json.loads, path.read_text().splitlines()) if r.get("index") is not None}


def report(grid: Path) -> list:
    plan = json.loads((grid / "plan.json").read_text())
    n = plan["n"]
    rows = []
    for style in ("verbose", "dense"):
        full_path = grid / f"records-kara-w512-u64-{style}-0.jsonl"
        full = read(full_path) if full_path.exists() else {}
        for path in sorted(grid.glob(f"records-*-{style}-*.jsonl")):
            lane = path.name[len("records-"):-len(f"-{style}-0.jsonl")]
            recs = read(path)
            setting = next(iter(recs.values()))["setting"] if recs else "?"
            right = sum(bool(r["correct"]) for r in recs.values())
            row = {"grid": grid.name, "lane": lane, "style": style, "setting": setting, "n": n,
                   "finished": len(recs), "right": right,
                   "accuracy_bounds": [round(right / n, 3), round((right + n - len(recs)) / n, 3)],
                   "runaway": sum(r["finish_reason"]["type"] == "length" for r in recs.values() if r.get("finish_reason"))}
            if full and path != full_path:
                both = [i for i in recs if i in full]
                only_full = sum(full[i]["correct"] and not recs[i]["correct"] for i in both)
                only_this = sum(recs[i]["correct"] and not full[i]["correct"] for i in both)
                row.update(full_kv_right_on_finished=sum(bool(full[i]["correct"]) for i in both),
                           only_full_right=only_full, only_this_right=only_this,
                           p_mcnemar_exact=round(mcnemar_exact(only_full, only_this), 4))
                missing = [full[i]["completion_tokens"] for i in full if i not in recs]
                if missing:
                    row["unfinished_full_kv_reply_tokens_median"] = median(missing)
                    row["finished_full_kv_reply_tokens_median"] = median(full[i]["completion_tokens"] for i in both)
            rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("grids", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    a = ap.parse_args()
    rows = [row for grid in a.grids for row in report(grid)]
    print("| grid | lane | style | setting | finished / n | right | bounds over n | full KV right on those | "
          "only full KV right | only this right | McNemar p | full-KV reply tokens: unfinished / finished |")
    print("|" + "---|" * 12)
    for r in rows:
        lengths = (f"{r['unfinished_full_kv_reply_tokens_median']:.0f} / {r['finished_full_kv_reply_tokens_median']:.0f}"
                   if "unfinished_full_kv_reply_tokens_median" in r else "-")
        print(f"| {r['grid']} | {r['lane']} | {r['style']} | {r['setting']} | {r['finished']} / {r['n']} | {r['right']} | "
              f"{r['accuracy_bounds'][0]:.1%}-{r['accuracy_bounds'][1]:.1%} | {r.get('full_kv_right_on_finished', '-')} | "
              f"{r.get('only_full_right', '-')} | {r.get('only_this_right', '-')} | {r.get('p_mcnemar_exact', '-')} | {lengths} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
