"""Measured properties of the ledger task (benchmarks/reasoning/ledger.py), with a tokenizer.

For each held-out problem: reasoning length in tokens, and every *answer-bearing read*: a
place in the reference trace where the target account's earlier balance is written down again
(each recall of the target's last balance, and the final statement of it before the answer),
with how far back, in tokens, its source is:

- ``first``: the step that computed the value (the only place the prompt points to);
- ``nearest``: the closest earlier place the same value was written for that account (the
  verbose style restates it in its check and in recaps; dense writes it once).

    python benchmarks/reasoning/properties.py --model data/models/smollm2-135m-instruct --n 500
"""

from __future__ import annotations

import argparse
import bisect
import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ledger  # noqa: E402


def _token_index(offsets: List[int], char: int) -> int:
    return bisect.bisect_right(offsets, char) - 1


def reads_of(problem: ledger.Problem, offsets: List[int]) -> List[Dict[str, int]]:
    """Answer-bearing reads of one problem, as token distances to their sources."""
    text = problem.completion
    out = []
    for read_char, source_chars in problem.target_reads:
        first = min(source_chars)
        nearest = max(c for c in source_chars if c < read_char)
        t = _token_index(offsets, read_char)
        out.append({"first": t - _token_index(offsets, first), "nearest": t - _token_index(offsets, nearest)})
    assert all(r["nearest"] > 0 for r in out), text[:200]
    return out


def measure(tokenizer, style: str, n: int, seed0: int) -> dict:
    lengths, reads, per_problem = [], [], []
    for i in range(n):
        p = ledger.make_problem(style, seed0 + i)
        enc = tokenizer(p.completion, return_offsets_mapping=True)
        offsets = [a for a, _ in enc["offset_mapping"]]
        trace_tokens = _token_index(offsets, p.completion.index(ledger.THINK_END))
        lengths.append(trace_tokens)
        r = reads_of(p, offsets)
        reads += r
        per_problem.append(len(r))
    share = lambda key: sum(r[key] >= 1024 for r in reads) / len(reads)  # noqa: E731
    return {
        "style": style, "problems": n,
        "trace_tokens_median": statistics.median(lengths), "trace_tokens_mean": round(statistics.mean(lengths)),
        "trace_tokens_max": max(lengths), "problems_with_trace_ge_8000": sum(t >= 8000 for t in lengths),
        "answer_bearing_reads": len(reads), "reads_per_problem_mean": round(statistics.mean(per_problem), 2),
        "share_reads_from_first_source_ge_1024": round(share("first"), 3),
        "share_reads_from_nearest_copy_ge_1024": round(share("nearest"), 3),
        "read_distance_first_median": statistics.median(r["first"] for r in reads),
        "read_distance_nearest_median": statistics.median(r["nearest"] for r in reads),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="folder with the tokenizer")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed0", type=int, default=1_000_000, help="train.EVAL_SEED0: the held-out problems")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model)
    rows = [measure(tok, style, a.n, a.seed0) for style in ledger.STYLES]
    for row in rows:
        print(json.dumps(row))
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
