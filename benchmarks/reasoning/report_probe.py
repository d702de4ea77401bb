"""Reads from compressed windows, per scorer, from a score_probe.py result.

    python benchmarks/reasoning/report_probe.py --probe probe.json --tokenizer DIR [--out rows.json]

A read (a balance written again from memory) whose value still has a copy in the uncompressed
part of the context when it is written is easy for every scorer; the ones that test a scorer
are those whose every copy sits in a window already compressed. This recomputes, per problem,
which reads are which (the probe's schedule and the model's tokenizer), and estimates per
setting the share of compressed-only reads still right: (reads right - reads with an
uncompressed copy) / compressed-only reads, summed over problems (with full KV every read is
right, so reads with an uncompressed copy are counted right; the estimate is exact when they
stay right under compression and a lower bound otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ledger  # noqa: E402
from score_probe import tokenize, windows  # noqa: E402


def read_kinds(tokenizer, style: str, seed: int, window: int, buffer: int,
               trace_tokens: Optional[int] = None) -> Tuple[int, int, int]:
    """(tokens, reads with a copy outside every compressed window, reads with none)."""
    p = ledger.make_problem(style, seed, trace_tokens)
    ids, prompt_len, char_tok = tokenize(tokenizer, p)
    total = len(ids)
    wins = windows(prompt_len, total, window, buffer)
    easy = hard = 0
    for char, _account, sources in p.all_reads:
        at = char_tok[char]
        hidden = lambda s: any(start <= char_tok[s] < start + window and due <= at for start, due in wins)  # noqa: E731
        if all(hidden(s) for s in sources):
            hard += 1
        else:
            easy += 1
    return total, easy, hard


def report(probe: dict, tokenizer) -> List[dict]:
    kinds: Dict[Tuple[str, int], Tuple[int, int, int]] = {}
    for rec in probe["records"]:
        total, easy, hard = kinds.setdefault((rec["style"], rec["seed"]), read_kinds(
            tokenizer, rec["style"], rec["seed"], probe["window"], probe["buffer"], probe.get("trace_tokens")))
        if total != rec["tokens"]:
            raise SystemExit(f"{rec['style']} {rec['seed']}: {total} tokens here, {rec['tokens']} in the probe "
                             "(another tokenizer?)")
        if easy + hard != rec["outcomes"]["full"]["reads"]:
            raise SystemExit(f"{rec['style']} {rec['seed']}: read count differs from the probe's")
    rows = []
    for style in sorted({r["style"] for r in probe["records"]}):
        mine = [r for r in probe["records"] if r["style"] == style]
        easy = sum(kinds[(style, r["seed"])][1] for r in mine)
        hard = sum(kinds[(style, r["seed"])][2] for r in mine)
        for setting in mine[0]["outcomes"]:
            right = sum(r["outcomes"][setting]["reads_right"] for r in mine)
            rows.append({"style": style, "setting": setting, "problems": len(mine), "reads": easy + hard,
                         "reads_with_uncompressed_copy": easy, "compressed_only_reads": hard,
                         "reads_right": right, "compressed_only_right_share": (right - easy) / hard if hard else None})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--probe", required=True)
    ap.add_argument("--tokenizer", required=True, help="the probed model's folder (its tokenizer)")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    rows = report(json.loads(Path(a.probe).read_text()), AutoTokenizer.from_pretrained(a.tokenizer))
    print(f"{'style':8} {'setting':20} {'reads':>6} {'compressed-only':>15} {'reads right':>11} "
          f"{'compressed-only right':>22}")
    for r in rows:
        share = r["compressed_only_right_share"]
        print(f"{r['style']:8} {r['setting']:20} {r['reads']:6d} {r['compressed_only_reads']:15d} "
              f"{100 * r['reads_right'] / r['reads']:10.1f}% {'' if share is None else f'{100 * share:21.1f}%'}")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
