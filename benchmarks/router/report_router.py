"""Merge multi_turn_router.py rows into docs/results/router.json and print the docs tables.

    python benchmarks/router/report_router.py                                # tables of the stored rows
    python benchmarks/router/report_router.py RUN/router.json [...] --merge  # add a run (e.g. a GPU call's $OUT)

A row is identified by its device (``"device"``: ``cpu`` or the GPU's name; rows written before
that field existed take ``settings.device``), model and policy: a merged row replaces the stored row
of the same device, model and policy and leaves every other row (the CPU rows included) as it was. One table per
device and model, with the columns of docs/scale-out.md's router tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STORE = ROOT / "docs" / "results" / "router.json"
LABELS = {"vanilla": "vanilla", "kara": "Kara, `--kara-scope all`"}


def device_of(row: dict) -> str:
    return row.get("device") or row["settings"]["device"]


def model_of(row: dict) -> str:
    return row.get("model") or "tiny random Qwen2 (kara_sglang.demo_model)"  # rows before the field: CPU


def key(row: dict) -> tuple:
    return device_of(row), model_of(row), row["policy"]


def merge(stored: list, new: list) -> list:
    rows = list(stored)
    for row in new:
        same = [i for i, r in enumerate(rows) if key(r) == key(row)]
        if same:
            rows[same[0]] = row
        else:
            rows.append(row)
    return rows


def pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def workers(row: dict) -> str:
    served = row["worker_per_conversation_turn"]
    if len(served) <= 4:  # the CPU table's column: c0 c1 ..., turns 1-N
        return " / ".join(",".join("?" if w is None else str(w) for w in ws) for ws in served.values())
    firsts = [ws[0] for ws in served.values()]
    split = " / ".join(str(firsts.count(w)) for w in range(row["replicas"]))
    return f"{row['conversations_on_one_worker']} of {len(served)} on one worker (first turn: {split} per worker)"


def table_row(row: dict) -> str:
    turns = row["turns"]
    comp = " / ".join(str(c) for c in row.get("compressions_per_replica", []))
    if row["policy"] != "vanilla" and row.get("opt_out_through_router"):
        comp += " (incl. the opt-out check below)"
    label = LABELS.get(row["policy"], row["policy"])
    if not row.get("complete", True):
        label += f" (cut short after turn {len(turns)})"
    return "| " + " | ".join([
        label,
        " / ".join(f"{t['prompt_tokens']:,}" for t in turns),
        " / ".join(pct(t["hit_ratio"]) for t in turns),
        pct(row["hit_ratio_after_first"]) if "hit_ratio_after_first" in row else "-",
        workers(row) if "worker_per_conversation_turn" in row else "-",
        comp or "-",
        f"{sum(row.get('retractions_per_replica', []))} / {len(row['errors'])}",
        f"{row['seconds']:.1f} s",
    ]) + " |"


def tables(rows: list) -> str:
    groups: dict = {}
    for row in rows:
        groups.setdefault((device_of(row), model_of(row)), []).append(row)
    out = []
    for (device, model), group in groups.items():
        s = group[0]["settings"]
        ext = f"W = {s['window']}, U = {s['buffer']}, keep {pct(s['keep'])}, chunk {s.get('chunk_size', 2)}"
        out.append(f"{device}, {model}: {s['conversations']} conversations x "
                   f"{s['turns']} turns, {s['reply']}-token replies, {s['replicas']} replicas; Kara {ext}\n")
        turns = " / ".join(str(t + 1) for t in range(s["turns"]))
        conv = (" ".join(f"c{i}" for i in range(s["conversations"])) + f", turns 1-{s['turns']}"
                if s["conversations"] <= 4 else "all conversations")
        where = "CPU" if device == "cpu" else device
        out.append(f"| policy | prompt tokens (turn {turns}) | hit ratio per turn ({turns}) | hit ratio turns 2+ "
                   f"| worker per conversation ({conv}) | compressions per worker | retractions / errors "
                   f"| end-to-end ({where}) |")
        out.append("|---|---|---|---|---|---|---|---|")
        out += [table_row(r) for r in group]
        startup = [f"{r['policy']} {r['startup_s']:.1f} s" for r in group if "startup_s" in r]
        if startup:
            out.append(f"\nStart-up (replicas up and the router routing): {', '.join(startup)}.")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="*", help="JSON files of rows (multi_turn_router.py --out, run_router.sh's $OUT/router.json)")
    ap.add_argument("--store", default=str(STORE))
    ap.add_argument("--merge", action="store_true", help="write the merged rows back to --store")
    args = ap.parse_args()
    store = Path(args.store)
    rows = json.loads(store.read_text()) if store.exists() else []
    for run in args.runs:
        rows = merge(rows, json.loads(Path(run).read_text()))
    if args.merge:
        store.write_text(json.dumps(rows, indent=1))
    print(tables(rows))


if __name__ == "__main__":
    main()
