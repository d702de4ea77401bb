"""One lane's answers, problem by problem, against full KV and plain Kara of the same model.

    python benchmarks/reasoning/paired_lanes.py --reference DIR --lane tier-p64-h4096 PART [PART ...] \
        [--json OUT.json]

``DIR`` is a grid folder (run_grid.py) with the Kara lane's records: full KV (``vanilla``) and
plain Kara at each keep ratio, over problems 0 .. n-1. Each ``PART`` is a grid folder of the
same trained model that ran ``--lanes LANE`` over the problems its ``plan.json`` names (``first``
to ``first + n - 1``: run_grid.py ``--first``), so a lane too slow for one device call can run in
parts. Records are ``records-<lane>-<style>-<k>.jsonl`` or ``.jsonl.gz``; a part cut short has
the requests that ended (the short replies first), and its rows say how many finished. Every
comparison is on the problems the lane finished: its right answers, full KV's and plain Kara's
on the same problems, the discordant pairs with full KV and McNemar's exact p.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from kara_sglang.accuracy.stats import wilson_interval  # noqa: E402
from paired import mcnemar_exact  # noqa: E402

KARA_LANE = "kara-w512-u64"


def problems(grid: Path) -> tuple:
    """(first, n): the held-out problems a grid ran (plan.json; ``first`` 0 before --first)."""
    plan = json.loads((grid / "plan.json").read_text())
    return plan.get("first", 0), plan["n"]


def read_records(grid: Path, lane: str, style: str, first: int) -> dict:
    """setting -> {absolute problem index -> record}, over every ``k`` of the lane's style."""
    out: dict = {}
    for path in sorted(grid.glob(f"records-{lane}-{style}-*.jsonl*")):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt") as f:
            for rec in map(json.loads, filter(str.strip, f)):
                out.setdefault(rec["setting"], {})[first + rec["index"]] = rec
    return out


def pair(reference: Path, lane: str, parts: list, styles=("verbose", "dense")) -> list:
    """A row per (style, setting, part), and with several parts one more over all of them."""
    rows = []
    for style in styles:
        ref = read_records(reference, KARA_LANE, style, problems(reference)[0])
        full = ref["vanilla"]
        runs, together = [], {}
        for part in parts:
            first, n = problems(part)
            for setting, recs in read_records(part, lane, style, first).items():
                runs.append((part.name, first, n, setting, recs))
                span, merged = together.setdefault(setting, ([], {}))
                span.append((first, n))
                merged.update(recs)
        if len(parts) > 1:
            for setting, (span, merged) in together.items():
                low = min(f for f, _ in span)
                runs.append(("all parts", low, max(f + n for f, n in span) - low, setting, merged))
        for name, first, n, setting, recs in sorted(runs, key=lambda r: (r[3], r[0] == "all parts", r[1])):
            done = sorted(i for i in recs if i in full)
            right = sum(bool(recs[i]["correct"]) for i in done)
            full_right = sum(bool(full[i]["correct"]) for i in done)
            only_full = sum(bool(full[i]["correct"]) and not recs[i]["correct"] for i in done)
            only_this = sum(bool(recs[i]["correct"]) and not full[i]["correct"] for i in done)
            plain = ref.get(setting, {})
            low, high = wilson_interval(right, len(done)) if done else (0.0, 0.0)
            rows.append({
                "style": style, "lane": lane, "setting": setting, "part": name,
                "problems": [first, first + n - 1], "n": n, "finished": len(done), "right": right,
                "accuracy_finished": round(right / len(done), 4) if done else None,
                "ci95_finished": [round(low, 4), round(high, 4)],
                "full_kv_right": full_right,
                "plain_kara_right": sum(bool(plain[i]["correct"]) for i in done) if plain else None,
                "only_full_kv_right": only_full, "only_this_right": only_this,
                "p_mcnemar_exact": round(mcnemar_exact(only_full, only_this), 4),
                "points_vs_full_kv": round(100 * (right - full_right) / len(done), 1) if done else None,
            })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, type=Path, help="grid folder with the Kara lane")
    ap.add_argument("--lane", required=True)
    ap.add_argument("parts", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    rows = pair(a.reference, a.lane, a.parts)
    print("| style | setting | problems | finished | this lane | full KV | plain Kara | only full KV / only this | p |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = max(r["finished"], 1)
        plain = "-" if r["plain_kara_right"] is None else f"{r['plain_kara_right']} ({100 * r['plain_kara_right'] / f:.1f}%)"
        print(f"| {r['style']} | {r['setting']} | {r['problems'][0]}-{r['problems'][1]} | {r['finished']} / {r['n']} "
              f"| {r['right']} ({100 * r['right'] / f:.1f}%) | {r['full_kv_right']} ({100 * r['full_kv_right'] / f:.1f}%) "
              f"| {plain} | {r['only_full_kv_right']} / {r['only_this_right']} | {r['p_mcnemar_exact']} |")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
