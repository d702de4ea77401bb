"""Paired comparisons of the reasoning grid's rows, from the committed per-problem outcomes.

    python benchmarks/reasoning/paired.py [--per-problem docs/results/raw-2026-11-30/reasoning_per_problem.json.gz]
        [--out docs/results/reasoning_paired.json]

Every row of the grid answered the same 500 held-out problems per style, so two rows are
compared problem by problem, not by whether their Wilson intervals overlap: McNemar's exact
test on the discordant pairs (b = right only in the first row, c = right only in the second;
two-sided binomial p with n = b + c, p = 0.5). The p-values are per comparison, not corrected
for the number of comparisons printed.

Also, per style, how far Kara 25%'s replies are from full KV's in length (the committed
first_error.json mapped positions through the reference's tokens, exact only where the reply
follows the reference),
and the no-trace rows against 1% (a two-digit answer guessed at random).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from math import comb
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from kara_sglang.accuracy.stats import wilson_interval  # noqa: E402

PER_PROBLEM = "docs/results/raw-2026-11-30/reasoning_per_problem.json.gz"
MAIN = "kara:keep=0.25/kara-w512-u64"  # Kara 25%, W = 512, U = 64, γ = 8 (the plugin's defaults)
# (label, the row compared with MAIN) for each style.
AGAINST_MAIN = [
    ("U = 32 (W = 512, γ = 8)", "kara:keep=0.25/kara-w512-u32"),
    ("W = 256 (U = 64, γ = 8)", "kara:keep=0.25/kara-w256-u64"),
    ("γ = 1, no Token2Chunk (W = 512, U = 64)", "kara:keep=0.25,chunk=1/kara-w512-u64-b"),
    ("CASK keep 25%", "cask:keep=0.25/cask"),
]
BASELINE_BUDGET = {"verbose": 673, "dense": 618}  # run_grid's budgets matched to Kara 25%'s decode KV


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def pvalue(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else "< 0.001"


def outcomes(rows: dict, key: str) -> dict:
    """problem index -> (correct, completion tokens) of one row."""
    return {r[0]: (bool(r[1]), r[2]) for r in rows[key]}


def compare(rows: dict, style: str, first: str, second: str) -> dict:
    a, b = outcomes(rows, f"{style}/{first}"), outcomes(rows, f"{style}/{second}")
    assert a.keys() == b.keys(), "rows of different problems"
    only_a = sum(1 for i in a if a[i][0] and not b[i][0])
    only_b = sum(1 for i in a if b[i][0] and not a[i][0])
    return {"style": style, "first": first, "second": second, "n": len(a),
            "first_correct": sum(v[0] for v in a.values()), "second_correct": sum(v[0] for v in b.values()),
            "only_first": only_a, "only_second": only_b, "p_mcnemar_exact": round(mcnemar_exact(only_a, only_b), 4)}


def length_gap(rows: dict, style: str, threshold: int = 50) -> dict:
    full, kara = outcomes(rows, f"{style}/vanilla/kara-w512-u64"), outcomes(rows, f"{style}/{MAIN}")
    diff = [kara[i][1] - full[i][1] for i in full]
    return {"style": style, "n": len(diff), "threshold_tokens": threshold,
            "differ": sum(1 for d in diff if abs(d) > threshold),
            "shorter": sum(1 for d in diff if d < -threshold), "longer": sum(1 for d in diff if d > threshold)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-problem", default=PER_PROBLEM)
    ap.add_argument("--out", default=None, help="write every number printed as JSON")
    a = ap.parse_args()
    rows = json.load(gzip.open(a.per_problem, "rt"))["rows"]
    result = {"source": a.per_problem, "paired": [], "length_gap": [], "no_trace": []}

    print("| style | Kara 25% (W = 512, U = 64, γ = 8) against | right: Kara 25% / other | right only in Kara 25% "
          "| right only in other | McNemar exact p |")
    print("|---|---|---|---|---|---|")
    for style in ("verbose", "dense"):
        others = AGAINST_MAIN + [(f"threshold budget {BASELINE_BUDGET[style]}",
                                  f"threshold:budget={BASELINE_BUDGET[style]}/threshold")]
        for label, other in others:
            r = compare(rows, style, MAIN, other)
            r["label"] = label
            result["paired"].append(r)
            print(f"| {style} | {label} | {r['first_correct']} / {r['second_correct']} of {r['n']} | "
                  f"{r['only_first']} | {r['only_second']} | {pvalue(r['p_mcnemar_exact'])} |")

    print("\nKara 25% reply length against full KV's, same problem:")
    for style in ("verbose", "dense"):
        g = length_gap(rows, style)
        result["length_gap"].append(g)
        print(f"  {style}: {g['differ']} of {g['n']} differ by more than {g['threshold_tokens']} tokens "
              f"({g['shorter']} shorter, {g['longer']} longer)")

    print("\nanswer without reasoning (full KV) against 1% (a guessed two-digit answer):")
    for style in ("verbose", "dense"):
        right = sum(bool(r[1]) for r in rows[f"{style}/no-trace/notrace-{style}"])
        n = len(rows[f"{style}/no-trace/notrace-{style}"])
        low, high = wilson_interval(right, n)
        result["no_trace"].append({"style": style, "n": n, "correct": right, "ci_low": round(low, 4),
                                   "ci_high": round(high, 4), "excludes_1_percent": low > 0.01})
        print(f"  {style}: {right} of {n} = {100 * right / n:.1f}% (95% CI {100 * low:.1f}-{100 * high:.1f}%): "
              f"{'above' if low > 0.01 else 'consistent with'} 1%")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
