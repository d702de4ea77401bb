"""How often a recall horizon binds on the ledger task: which reads' sources a tier holding only
each request's last H evicted tokens (``--kara-recall-horizon H``) has already dropped.

No model and no GPU: the reads come from the task generator (benchmarks/reasoning/ledger.py),
every recall of a balance (``all_reads``: the queried account's and the others'), and Kara's
window bookkeeping says, at each read, how many tokens were evicted after the source's window.
Decode position ``t`` (tokens after the prompt) has seen ``max(0, (t - U) // W)`` compressions
(a window compresses when the uncompressed tail reaches W + U, and W tokens of it go), each
evicting ``W - keep`` tokens. A source in window ``j`` evicted a token at eviction index
``j * e`` or later (``e`` tokens a window), so with ``E`` evicted at the read it is past the
horizon if ``E - (j + 1) * e >= H`` (every evicted token of its window dropped), within if
``E - j * e <= H`` (none dropped), partly past between (some of its window dropped: whether the
source is depends on which tokens the window evicted, counted apart). A source still in the
uncompressed tail, or in the prompt, is never in the tier's question.

Token positions are characters scaled to the measured token counts of the held-out problems
(the trace's median characters per token, SmolLM2's tokenizer, from
docs/results/raw-2026-11-30/ledger_properties.json): an estimate, accurate to a step or two.

    python benchmarks/reasoning/horizon_reach.py --n 500 --horizon 1024 2048 4096
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ledger  # noqa: E402

# Median reasoning tokens of the 500 held-out problems per style (properties.py, SmolLM2's
# tokenizer): the character scale of this estimate.
MEASURED_MEDIAN_TOKENS = {"dense": 2172, "verbose": 2380}
EVAL_SEED0 = 1_000_000  # train.EVAL_SEED0: the held-out problems


def chars_per_token(style: str, n: int, seed0: int) -> float:
    chars = [ledger.make_problem(style, seed0 + i).completion.index(ledger.THINK_END) for i in range(n)]
    return statistics.median(chars) / MEASURED_MEDIAN_TOKENS[style]


def reach(t: int, s: int, window: int, buffer: int, evicted_per_window: int, horizon: int) -> str:
    """Where a read at decode token ``t`` finds its source at decode token ``s`` (``s < t``):
    ``tail`` (never compressed by then), ``within``, ``partly`` or ``past`` the horizon."""
    compressed = max(0, (t - buffer) // window)
    j = s // window
    if j >= compressed:
        return "tail"
    evicted = compressed * evicted_per_window
    if evicted - (j + 1) * evicted_per_window >= horizon:
        return "past"
    if evicted - j * evicted_per_window <= horizon:
        return "within"
    return "partly"


def measure(style: str, n: int, seed0: int, window: int, buffer: int, keep: float, horizons: Sequence[int],
            trace_tokens: int = 0) -> Dict:
    scale = chars_per_token(style, min(n, 100), seed0)
    evicted_per_window = window - max(1, round(keep * window))
    counts = {h: {"all": dict.fromkeys(("tail", "within", "partly", "past"), 0),
                  "target": dict.fromkeys(("tail", "within", "partly", "past"), 0),
                  "problems_with_a_read_past": 0} for h in horizons}
    distances: List[int] = []
    for i in range(n):
        p = ledger.make_problem(style, seed0 + i, trace_tokens or None)
        reads = [(char, acct, src) for char, acct, src in p.all_reads]
        for h in horizons:
            any_past = False
            for char, acct, src in reads:
                t, s = int(char / scale), int(max(c for c in src if c < char) / scale)
                where = reach(t, s, window, buffer, evicted_per_window, h)
                counts[h]["all"][where] += 1
                if acct == p.target:
                    counts[h]["target"][where] += 1
                any_past |= where == "past"
            counts[h]["problems_with_a_read_past"] += any_past
        distances += [int((char - max(c for c in src if c < char)) / scale) for char, _, src in reads]
    return {"style": style, "keep": keep, "window": window, "buffer": buffer, "problems": n,
            "trace_tokens": trace_tokens or "the task's own", "chars_per_token": round(scale, 3),
            "reads": len(distances), "read_distance_median": statistics.median(distances),
            "read_distance_p90": sorted(distances)[int(0.9 * len(distances))],
            "by_horizon": {str(h): c for h, c in counts.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed0", type=int, default=EVAL_SEED0)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--buffer", type=int, default=64)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.25, 0.125])
    ap.add_argument("--horizon", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--trace-tokens", type=int, default=0, help="force every trace to this length (0: the task's)")
    ap.add_argument("--json", help="write the rows here")
    a = ap.parse_args()
    rows = [measure(style, a.n, a.seed0, a.window, a.buffer, keep, a.horizon, a.trace_tokens)
            for style in ledger.STYLES for keep in a.keep]
    print("| style | keep | horizon | reads past (all) | partly past | problems with a read past | "
          "queried account's reads past |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        for h, c in r["by_horizon"].items():
            total, target = sum(c["all"].values()), sum(c["target"].values())
            print(f"| {r['style']} | {r['keep']:.1%} | {int(h):,} | {c['all']['past'] / total:.1%} | "
                  f"{c['all']['partly'] / total:.1%} | {c['problems_with_a_read_past'] / r['problems']:.1%} | "
                  f"{c['target']['past'] / max(target, 1):.1%} |")
    for r in {r["style"]: r for r in rows}.values():  # the reads are the same at every keep
        print(f"{r['style']}: {r['reads']} reads in {r['problems']} problems, median {r['read_distance_median']} "
              f"tokens back, p90 {r['read_distance_p90']} ({r['chars_per_token']} chars/token)")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
