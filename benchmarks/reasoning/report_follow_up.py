"""run_follow_up.py's rows and records -> docs/results/follow_up_accuracy.json and a table.

    python benchmarks/reasoning/report_follow_up.py --grid DIR --device "NVIDIA H200" \\
        --tokenizer data/models/smollm2-135m-instruct --out docs/results/follow_up_accuracy.json

Per lane, style and arm: turn-1 and turn-2 accuracy with Wilson 95% intervals, turn 2 among
the problems turn 1 got right, the tokens turn 2 prefilled, the KV held. With ``--tokenizer``
also turn 2's accuracy split by where the asked account last changed: in the uncompressed tail
at the end of turn 1 or in a window Kara had compressed. Kara compresses a window once W + U
tokens past its start exist, so the tail at the end of a reply of n tokens is its last
U .. W + U - 1 tokens (n - U rounded down to whole windows is compressed): a step 100 tokens
from the end may be compressed and one 500 tokens back may not. The split applies that
schedule to the model's own reply length (``turn1.completion_tokens``); the step's distance
from the end is measured in the model's own reply where the records keep its text (``text1``,
follow_up.py writes it since the 2026-12-01 run), else on the *reference* reply, which the
model's reply matches token for token in the dense style up to its first mistake but only
approximately in the verbose one (its phrasings are drawn per step), so a verbose split from
the reference is an estimate. Each row says how many came from which.

W and U come from plan.json (run_follow_up records them); γ from the lane's
``--kara-chunk-size``, else the server's reported settings, else the plugin's default.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ledger  # noqa: E402

from kara_sglang.accuracy.stats import wilson_interval  # noqa: E402

from kara_sglang.config import KaraConfig  # noqa: E402

DEFAULTS = KaraConfig()  # the plugin's defaults: what a server ran for a flag it was not given


def in_uncompressed_tail(tokens_back: int, reply_tokens: int, window: int, buffer: int) -> bool:
    """Is the token ``tokens_back`` from the end of a ``reply_tokens``-token reply still in
    Kara's uncompressed tail when the reply ends? (Windows ``[kW, (k+1)W)`` of the reply compress
    once W + U tokens past kW exist, so the first ``(n - U) // W`` whole windows are compressed.)"""
    compressed = max(0, (reply_tokens - buffer) // window) * window
    return reply_tokens - tokens_back >= compressed


def share(hits: int, n: int) -> dict:
    low, high = wilson_interval(hits, n)
    return {"n": n, "accuracy": round(hits / n, 4) if n else None, "ci_low": round(low, 4), "ci_high": round(high, 4)}


def flag(args: list, name: str):
    """A launch flag's value in a lane's server args (run_follow_up.plan), or None."""
    return args[args.index(name) + 1] if name in args else None


def tokens_back(tokenizer, problem: ledger.Problem, account: str, reply: str | None = None) -> int | None:
    """Tokens from the asked account's last step to the end of the reply: the model's own
    ``reply`` when given (None if that step's line is not in it), else the reference reply."""
    step = max(st.index for st in problem.steps if st.account == account)
    text = problem.completion if reply is None else reply
    found = re.search(rf"(^|\n)(Step )?{step}[:. ]", text)
    if found is None:
        return None
    return len(tokenizer(text[found.start():]).input_ids)


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
        stem = Path(a.grid, f"followup-records-{lane}-{style}-{arm}.jsonl")
        gz = stem.with_name(stem.name + ".gz")  # run_follow_up compresses them when it is done
        with (gzip.open(gz, "rt") if gz.exists() else open(stem)) as f:
            records = [json.loads(line) for line in f]
        right1 = [r for r in records if r["correct1"]]
        args, kara = lanes[lane], summary["server"]["kv_policy"] not in (None, "none")
        keep = flag(args, "--kara-keep-ratio")
        reported = summary["server"].get("kara_config") or {}
        chunk = int(flag(args, "--kara-chunk-size") or reported.get("chunk_size") or DEFAULTS.chunk_size)
        row = {"task": "ledger-follow-up", "style": style, "server": lane, "arm": arm,
               "policy": summary["server"]["kv_policy"] or "full", "keep_ratio": float(keep) if keep else None,
               "window": int(flag(args, "--kara-window")) if kara else None,
               "buffer": int(flag(args, "--kara-buffer")) if kara else None, "chunk": chunk if kara else None,
               "turn1": share(sum(r["correct1"] for r in records), len(records)),
               "turn2": share(sum(r["correct2"] for r in records), len(records)),
               "turn2_given_turn1_right": share(sum(r["correct2"] for r in right1), len(right1)),
               "turn2_prefilled_mean": summary["turn2_prefilled_mean"],
               "turn2_prompt_tokens_mean": summary["turn2_prompt_tokens_mean"],
               "turn1_kv_held_mean": summary["turn1_kv_held_mean"],
               "turn2_kv_held_mean": summary["turn2_kv_held_mean"],
               "device": a.device, "sglang_version": summary["server"]["version"]}
        if tokenizer is not None:
            tail, compressed, sources = [], [], {"reply": 0, "reference": 0}
            for r in right1:
                problem = ledger.make_problem(style, r["seed"])
                back = tokens_back(tokenizer, problem, r["account"], r["text1"]) if r.get("text1") else None
                if back is not None:
                    sources["reply"] += 1
                else:
                    key = (style, r["seed"])
                    if key not in distance:  # the arms share problems: each is tokenized once
                        distance[key] = tokens_back(tokenizer, problem, r["account"])
                    back = distance[key]
                    sources["reference"] += 1
                where = in_uncompressed_tail(back, r["turn1"]["completion_tokens"], W, U)
                (tail if where else compressed).append(r["correct2"])
            row["turn2_given_turn1_right_by_asked_step"] = {
                "uncompressed_tail": share(sum(tail), len(tail)),
                "compressed_window": share(sum(compressed), len(compressed)),
                "positions_from_reply": sources["reply"], "positions_from_reference": sources["reference"]}
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
        print("\nturn 2 among turn-1-right, by where the asked account's last step was when turn 1 ended "
              "(Kara's schedule on the reply's length; step positions from the reference reply):")
        for r in rows:
            d = r["turn2_given_turn1_right_by_asked_step"]
            print(f"| {r['style']} | {r['server']} | {r['arm']} | " + " | ".join(
                f"{k}: {pct(v)} (n={v['n']})" for k, v in d.items() if not k.startswith("positions")) + " |")


if __name__ == "__main__":
    main()
