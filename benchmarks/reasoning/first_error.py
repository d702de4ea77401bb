"""Where a wrong answer went wrong: the first place a reply leaves the reference trace.

Each step line of a reply is parsed (account, starting balance, amount, new balance) and
compared with the reference steps (ledger.py; full KV reproduces them almost always); the
first step that differs is the first mistake, classified as:

- ``recall``: the starting balance read back from an earlier step is wrong: the long-range
  read compression can break (``start``: the same for a start balance, read from the prompt);
- ``arithmetic``: the new balance; ``prompt``: the step's account or amount is not the prompt's;
- ``format``: a garbled or missing step line; ``answer``: every step right, the answer wrong.

For ``recall`` mistakes it reports how far back (in tokens of the reference) the nearest copy
of the balance was written, and how many of those copies lay in a window that Kara's schedule
(each lane's W and U, from plan.json's launch flags) had already compressed when the balance
was read: for the window policies (kara, cask) that separates "the scorer dropped it" from "it
was still in the uncompressed tail" (a mistake the compression did not cause directly).

Positions are the *reply's own* tokens (its text re-tokenized): the read, the step the prompt
points to and the nearest earlier copy of the balance are found in the reply, which is what
the server's window schedule saw. Only where the reply cannot be parsed that far (a garbled
pointed-to step) does it fall back to the *reference* trace's tokens, which is exact where the
reply follows the reference token for token (the dense style: one line form; Kara 25%'s dense
replies are all within 50 tokens of full KV's length) and an estimate for the verbose style,
whose phrasings are drawn per step (230 of 500 Kara 25% verbose replies differ from full KV's
length by more than 50 tokens: ``paired.py``). Each row counts both
(``recall_positions_from_reply``, ``recall_positions_from_reference``). The 2026-11-30
first_error.json predates this and used the reference's tokens throughout.

    python benchmarks/reasoning/first_error.py --records DIR --model MODEL_DIR
"""

from __future__ import annotations

import argparse
import bisect
import glob
import gzip
import json
import re
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ledger  # noqa: E402
from train import EVAL_SEED0  # noqa: E402

DENSE = re.compile(r"^(\d+) (\w\w) @(\w+) (\d\d)([+-])(\d)=(\d\d)$")
VERBOSE_STEP = re.compile(r"^Step (\d+)")
VERBOSE_MATH = re.compile(r"So (\w\w) is now (\d\d) ([+-]) (\d) = (\d\d)\.")


def parse_steps(style: str, output: str):
    """(step, account, before, delta, after) per step line of a reply; None for a garbled line."""
    steps = []
    for line in output.split(ledger.THINK_END)[0].split("\n"):
        if style == "dense":
            if not line.strip():
                continue
            m = DENSE.match(line)
            steps.append(None if m is None else (int(m[1]), m[2], int(m[4]),
                                                 int(m[6]) * (1 if m[5] == "+" else -1), int(m[7])))
        elif VERBOSE_STEP.match(line):
            m = VERBOSE_MATH.search(line)
            steps.append(None if m is None else (int(VERBOSE_STEP.match(line)[1]), m[1], int(m[2]),
                                                 int(m[4]) * (1 if m[3] == "+" else -1), int(m[5])))
    return steps


def classify(problem: ledger.Problem, output: str):
    """(kind, step) of a reply's first mistake against the reference steps, or None.

    kind: ``prompt`` (the step's account or amount is not the prompt's), ``recall`` (the
    balance it starts from is wrong), ``start`` (the same, for a start balance read from the
    prompt), ``arithmetic``, ``format`` (a garbled or missing step line), ``answer``."""
    got = parse_steps(problem.style, output)
    for k, ref in enumerate(problem.steps):
        if k >= len(got) or got[k] is None:
            return "format", ref
        index, account, before, delta, after = got[k]
        if index != ref.index or account != ref.account or delta != ref.delta:
            return "prompt", ref
        if before != ref.before:
            return ("start" if ref.prev == 0 else "recall"), ref
        if after != (before + delta) % 100:
            return "arithmetic", ref
    return "answer", None


def source_distance(problem: ledger.Problem, step: ledger.Step, offsets) -> Optional[Tuple[int, int, int]]:
    """Tokens of the reference's read of ``step``'s starting balance, of its nearest earlier
    copy, and of the step that computed it (the one the prompt points to)."""
    line_start = problem.completion.find(f"\n{step.index} ") + 1 if problem.style == "dense" \
        else problem.completion.find(f"Step {step.index}")
    for char, account, sources in problem.all_reads:
        if char >= line_start and account == step.account:
            t = bisect.bisect_right(offsets, char) - 1
            token = lambda c: bisect.bisect_right(offsets, c) - 1  # noqa: E731
            return t, token(max(c for c in sources if c < char)), token(min(sources))
    return None


RECALL_VALUE = re.compile(r"(?:where it became |Looking back at step \d+, \w\w was |From step \d+: \w\w = )(\d\d)")


def _step_line(style: str, think: str, index: int):
    """(start char, regex match) of step ``index``'s line in a reply's reasoning, or None."""
    start = 0
    for line in think.split("\n"):
        if style == "dense":
            m = DENSE.match(line)
            if m and int(m[1]) == index:
                return start, m
        else:
            head = VERBOSE_STEP.match(line)
            if head and int(head[1]) == index:
                return start, line
        start += len(line) + 1
    return None


def reply_positions(style: str, output: str, step: ledger.Step) -> Optional[Tuple[int, int, int]]:
    """Chars, in the reply itself, of the read of ``step``'s starting balance, of the nearest
    earlier copy of that balance, and of the value written by the step the prompt points to
    (``step.prev``); None when the reply does not have those lines in a parsable form."""
    think = output.split(ledger.THINK_END)[0]
    here, there = _step_line(style, think, step.index), _step_line(style, think, step.prev)
    if here is None or there is None:
        return None
    (at, m_here), (prev_at, m_prev) = here, there
    if style == "dense":
        read, first = at + m_here.start(4), prev_at + m_prev.start(7)
        return read, first, first  # a dense balance is written once, by its step
    recall = RECALL_VALUE.search(m_here)
    wrote = VERBOSE_MATH.search(m_prev)
    if recall is None or wrote is None:
        return None
    read, first = at + recall.start(1), prev_at + wrote.start(5)
    # Copies: the step's own "So ... = NN" and "Check ... ACCOUNT = NN", then recaps.
    copies = [prev_at + m.start(1) for m in re.finditer(
        rf"\b{step.account} (?:is now \d\d [+-] \d = |= )(\d\d)", think[prev_at:read])]
    return read, max(copies, default=first), first


def in_compressed_window(read: int, source: int, window: int, buffer: int) -> bool:
    """Was decode token ``source`` inside a window Kara/CASK had already compressed when token
    ``read`` was written? (Windows [kW, (k+1)W) compress once W + U tokens past kW exist.)"""
    done = max(0, (read - buffer) // window) * window
    return source < done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", required=True,
                    help="run_grid.py's output folder: plan.json and records-*.jsonl.gz (or .jsonl)")
    ap.add_argument("--model", required=True, help="folder with the tokenizer")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    from transformers import AutoTokenizer

    from kara_sglang.config import KaraConfig

    defaults = KaraConfig()
    plan = json.loads(Path(a.records, "plan.json").read_text())
    lane_args = {lane["name"]: lane["args"] for lane in plan["lanes"]}
    tok = AutoTokenizer.from_pretrained(a.model)
    problems, offsets = {}, {}
    rows = []

    def token_at(text: str):
        starts = [s for s, _ in tok(text, return_offsets_mapping=True)["offset_mapping"]]
        return lambda c: bisect.bisect_right(starts, c) - 1

    paths = sorted(glob.glob(f"{a.records}/records-*.jsonl.gz")) or sorted(glob.glob(f"{a.records}/records-*.jsonl"))
    for path in paths:
        if "notrace" in path:
            continue
        lane = Path(path).name[len("records-"):].split(".jsonl")[0]
        style = "dense" if "-dense" in lane else "verbose"
        args = lane_args[lane.split(f"-{style}-")[0]]
        window = int(args[args.index("--kara-window") + 1]) if "--kara-window" in args else defaults.window
        buffer = int(args[args.index("--kara-buffer") + 1]) if "--kara-buffer" in args else defaults.buffer
        kinds, far, far_first, dist, wrong, n, on_target = Counter(), 0, 0, [], 0, 0, 0
        from_reply = from_reference = 0
        setting = None
        for line in (gzip.open(path, "rt") if path.endswith(".gz") else open(path)):
            rec = json.loads(line)
            setting, n = rec["setting"], n + 1
            if rec["correct"]:
                continue
            wrong += 1
            key = (style, rec["index"])
            if key not in problems:
                p = problems[key] = ledger.make_problem(style, EVAL_SEED0 + rec["index"])
                offsets[key] = [s for s, _ in tok(p.completion, return_offsets_mapping=True)["offset_mapping"]]
            kind, step = classify(problems[key], rec["output"] or "")
            kinds[kind] += 1
            if step is not None and step.account == problems[key].target:
                on_target += 1
            if kind == "recall":
                chars = reply_positions(style, rec["output"] or "", step)
                if chars is not None:
                    token = token_at(rec["output"])
                    got = tuple(token(c) for c in chars)
                    from_reply += 1
                else:
                    got = source_distance(problems[key], step, offsets[key])
                    from_reference += got is not None
                if got is not None:
                    dist.append(got[0] - got[1])
                    far += in_compressed_window(got[0], got[1], window, buffer)
                    far_first += in_compressed_window(got[0], got[2], window, buffer)
        row = {"lane": lane, "style": style, "setting": setting, "n": n, "wrong": wrong,
               "first_error": dict(kinds), "first_error_on_queried_account": on_target,
               "recall_errors_measured": len(dist),
               "recall_source_median_tokens_back": statistics.median(dist) if dist else None,
               "recall_nearest_copy_in_compressed_window": far,
               "recall_computing_step_in_compressed_window": far_first,
               "recall_positions_from_reply": from_reply, "recall_positions_from_reference": from_reference}
        rows.append(row)
        print(json.dumps(row))
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
