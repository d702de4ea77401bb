"""run_follow_up.py's rows and records -> docs/results/follow_up_accuracy.json and a table.

    python benchmarks/reasoning/report_follow_up.py --grid DIR --device "NVIDIA H200" \\
        --tokenizer data/models/smollm2-135m-instruct --out docs/results/follow_up_accuracy.json

Per lane, style and arm: turn-1 and turn-2 accuracy with Wilson 95% intervals, turn 2 among
the problems turn 1 got right, the tokens turn 2 prefilled, the KV held. With ``--tokenizer``
also turn 2's accuracy split by where the asked account last changed in the reference reply:
within the last W + U tokens (never compressed before turn 2 on a Kara server) or further back.
"""

from __future__ import annotations

import argparse
import glob
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ledger  # noqa: E402

from kara_sglang.accuracy.stats import wilson_interval  # noqa: E402

GAMMA = 8  # Kara's default chunk size; run_follow_up.py does not set it


def share(hits: int, n: int) -> dict:
    low, high = wilson_interval(hits, n)
    return {"n": n, "accuracy": round(hits / n, 4) if n else None, "ci_low": round(low, 4), "ci_high": round(high, 4)}


def flag(args: list, name: str):
    """A launch flag's value in a lane's server args (run_follow_up.plan), or None."""
    return args[args.index(name) + 1] if name in args else None


def tokens_back(tokenizer, problem: ledger.Problem, account: str) -> int:
    """Tokens from the asked account's last step to the end of the reference reply."""
    step = max(st.index for st in problem.steps if st.account == account)
    start = re.search(rf"(^|\n)(Step )?{step}[:. ]", problem.completion).start()
    return len(tokenizer(problem.completion[start:]).input_ids)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", required=True, help="run_follow_up.py's output folder")
    ap.add_argument("--device", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", help="the served model's tokenizer: splits turn 2 by distance")
    a = ap.parse_args()

    tokenizer = None
    if a.tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    plan = json.loads(Path(a.grid, "followup-plan.json").read_text())
    lanes = {lane["name"]: lane["args"] for lane in plan["lanes"]}
    W, U = plan["W"], plan["U"]
    rows, distance = [], {}
    for path in sorted(glob.glob(f"{a.grid}/followup-*-*-*.json")):
        lane, style, arm = Path(path).stem.split("-")[1:]
        summary = json.loads(Path(path).read_text())
        records = [json.loads(line) for line in open(f"{a.grid}/followup-records-{lane}-{style}-{arm}.jsonl")]
        right1 = [r for r in records if r["correct1"]]
        args, kara = lanes[lane], summary["server"]["kv_policy"] not in (None, "none")
        keep = flag(args, "--kara-keep-ratio")
        row = {"task": "ledger-follow-up", "style": style, "server": lane, "arm": arm,
               "policy": summary["server"]["kv_policy"] or "full", "keep_ratio": float(keep) if keep else None,
               "window": int(flag(args, "--kara-window")) if kara else None,
               "buffer": int(flag(args, "--kara-buffer")) if kara else None, "chunk": GAMMA if kara else None,
               "turn1": share(sum(r["correct1"] for r in records), len(records)),
               "turn2": share(sum(r["correct2"] for r in records), len(records)),
               "turn2_given_turn1_right": share(sum(r["correct2"] for r in right1), len(right1)),
               "turn2_prefilled_mean": summary["turn2_prefilled_mean"],
               "turn2_prompt_tokens_mean": summary["turn2_prompt_tokens_mean"],
               "turn1_kv_held_mean": summary["turn1_kv_held_mean"],
               "turn2_kv_held_mean": summary["turn2_kv_held_mean"],
               "device": a.device, "sglang_version": summary["server"]["version"]}
        if tokenizer is not None:
            near, far = [], []
            for r in right1:
                key = (style, r["seed"])
                if key not in distance:  # the arms share problems: each is tokenized once
                    distance[key] = tokens_back(tokenizer, ledger.make_problem(style, r["seed"]), r["account"])
                (near if distance[key] <= W + U else far).append(r["correct2"])
            row["turn2_given_turn1_right_by_distance"] = {
                f"within_{W + U}": share(sum(near), len(near)), f"beyond_{W + U}": share(sum(far), len(far))}
        rows.append(row)
    Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")

    pct = lambda s: f"{100 * s['accuracy']:.1f}% ({100 * s['ci_low']:.1f}-{100 * s['ci_high']:.1f})" if s["n"] else "-"  # noqa: E731
    print("| style | server | arm | turn 1 | turn 2 | turn 2, turn 1 right | turn 2 prefilled | KV held at turn 2 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['style']} | {r['server']} | {r['arm']} | {pct(r['turn1'])} | {pct(r['turn2'])} | "
              f"{pct(r['turn2_given_turn1_right'])} | {r['turn2_prefilled_mean']:.1f} of {r['turn2_prompt_tokens_mean']:.0f} | "
              f"{r['turn2_kv_held_mean']:.0f} |")
    if tokenizer is not None:
        print("\nturn 2 among turn-1-right, by tokens from the asked account's last step to the reply's end:")
        for r in rows:
            d = r["turn2_given_turn1_right_by_distance"]
            print(f"| {r['style']} | {r['server']} | {r['arm']} | " + " | ".join(f"{k}: {pct(v)} (n={v['n']})" for k, v in d.items()) + " |")


if __name__ == "__main__":
    main()
