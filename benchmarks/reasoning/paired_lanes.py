"""One lane's answers, problem by problem, against full KV and plain Kara of the same model.

    python benchmarks/reasoning/paired_lanes.py --reference DIR [--reference DIR ...] \
        --lane tier-p64-h4096 PART [PART ...] [--json OUT.json]

Each ``DIR`` is a grid folder (run_grid.py) with the Kara lane's records: full KV (``vanilla``)
and plain Kara at each keep ratio, over the problems its ``plan.json`` names (the Kara lane may
run in parts too, one ``--reference`` each). Each ``PART`` is a grid folder of the
same trained model that ran ``--lanes LANE`` over the problems its ``plan.json`` names (``first``
to ``first + n - 1``: run_grid.py ``--first``), so a lane too slow for one device call can run in
parts. Records are ``records-<lane>-<style>-<k>.jsonl`` or ``.jsonl.gz``; a part cut short has
the requests that ended (the short replies first), and its rows say how many finished. Every
comparison is on the problems the lane finished: its right answers, full KV's and plain Kara's
on the same problems, the discordant pairs with full KV and McNemar's exact p.

``--accuracy-json docs/results/reasoning_accuracy.json --device NAME --source FOLDER`` also
writes the lane's rows in that file's format (report.py's ``row_for``, with the recall settings
from the part's launch flags), one per style and setting over all parts, with ``full_kv_accuracy``
of the same model on the same problems and the paired comparison; rows of the same source, lane,
style and setting are replaced. Only settings whose every request finished get a row.
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
from report import empty_block_share, lane_config, row_for  # noqa: E402

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


def read_reference(references: list, style: str) -> dict:
    """The Kara lane's records over all its parts: setting -> {absolute problem index -> record}."""
    out: dict = {}
    for grid in references:
        for setting, recs in read_records(grid, KARA_LANE, style, problems(grid)[0]).items():
            out.setdefault(setting, {}).update(recs)
    return out


def pair(references: list, lane: str, parts: list, styles=("verbose", "dense")) -> list:
    """A row per (style, setting, part), and with several parts one more over all of them."""
    rows = []
    for style in styles:
        ref = read_reference(references, style)
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


def lane_rows_files(part: Path, lane: str, style: str) -> list:
    """The server's rows of one part's lane and style (rows-<lane>-<style>-<k>.json)."""
    return [json.loads(path.read_text()) for path in sorted(part.glob(f"rows-{lane}-{style}-*.json"))]


def accuracy_rows(pairs: list, lane: str, parts: list, device: str, source: str) -> list:
    """reasoning_accuracy.json rows for each style and setting over all parts, every request finished."""
    whole = [r for r in pairs if r["part"] == ("all parts" if len(parts) > 1 else parts[0].name)]
    out = []
    for r in whole:
        if r["finished"] != r["n"]:
            print(f"no row for {r['style']} {r['setting']}: {r['finished']} of {r['n']} finished")
            continue
        served, records, cfg, version = [], [], None, None
        for part in parts:
            plan = json.loads((part / "plan.json").read_text())
            launched = next(ln for ln in plan["lanes"] if ln["name"] == lane)
            records += read_records(part, lane, r["style"], plan.get("first", 0)).get(r["setting"], {}).values()
            for result in lane_rows_files(part, lane, r["style"]):
                cfg = lane_config(launched, result.get("kara_config"))
                version = result.get("sglang_version") or plan.get("sglang_version")
                served += [x for x in result["rows"] if x["setting"] == r["setting"]]
        n = sum(x["n"] for x in served)

        def mean(key: str) -> float:
            return sum(x[key] * x["n"] for x in served) / n

        merged = {"setting": r["setting"], "custom_params": served[0]["custom_params"], "n": r["n"],
                  "correct": r["right"], "accuracy": r["accuracy_finished"], "ci95": r["ci95_finished"],
                  "kv_mean_fraction": mean("kv_mean_fraction"), "kv_mean_tokens": mean("kv_mean_tokens"),
                  "output_tokens_mean": mean("output_tokens_mean"), "errors": sum(x["errors"] for x in served)}
        row = row_for(cfg, r["style"], merged, device, version)
        row.update(empty_block_share=empty_block_share(records),
                   full_kv_accuracy=round(r["full_kv_right"] / r["n"], 4), source=source, lane=lane, paired={
            "problems": r["problems"], "plain_kara_accuracy": round(r["plain_kara_right"] / r["n"], 4),
            "only_full_kv_right": r["only_full_kv_right"], "only_this_right": r["only_this_right"],
            "p_mcnemar_exact": r["p_mcnemar_exact"]})
        out.append(row)
    return out


def merge_rows(path: Path, new: list) -> None:
    """Replace rows of the same source, lane, style and setting in path (a JSON list), append the rest."""
    key = lambda r: (r.get("source"), r.get("lane"), r["style"], r["setting"])  # noqa: E731
    fresh = {key(r) for r in new}
    rows = [r for r in json.loads(path.read_text()) if key(r) not in fresh] + new
    path.write_text(json.dumps(rows, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, type=Path, action="append",
                    help="grid folder with the Kara lane (repeat for a Kara lane run in parts)")
    ap.add_argument("--lane", required=True)
    ap.add_argument("parts", nargs="+", type=Path)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--accuracy-json", type=Path, default=None, help="reasoning_accuracy.json to add rows to")
    ap.add_argument("--device", default=None, help="the GPU the lane ran on (with --accuracy-json)")
    ap.add_argument("--source", default=None, help="the raw folder the parts are committed in (with --accuracy-json)")
    a = ap.parse_args()
    if a.accuracy_json and not (a.device and a.source):
        ap.error("--accuracy-json needs --device and --source")
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
    if a.accuracy_json:
        merge_rows(a.accuracy_json, accuracy_rows(rows, a.lane, a.parts, a.device, a.source))


if __name__ == "__main__":
    main()
