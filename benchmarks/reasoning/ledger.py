"""The ledger task: a long chain of thought whose answer lives only in the model's own trace.

A problem gives start balances and a list of transactions; the model works through them one
step at a time, and each step must recall the account's balance from the earlier step of its
own trace that last changed it (the prompt names that step, never the balance). The question
asks for one account's final balance, so the answer depends on a chain of intermediate
results that exist only in the reasoning: the prompt is never compressed, so dependencies on
it would test nothing.

    prompt:  Ledger 7. ... Start: QX=37 AB=12 ...
             1 AB-3 @s                        <- s: AB's start balance is its last value
             ...
             17 QX+7 @4                       <- step 4 last changed QX
             Question: final balance of QX?
    dense:   17 QX @4 37+7=44                 (one line a step, nothing restated)
    verbose: Step 17: add 7 to QX. QX last changed in step 4, where it became 37. So QX is
             now 37 + 7 = 44. Check: 44 - 7 = 37, right. QX = 44.
             (every 8 steps a recap restates the balances those steps changed: the
             redundancy of real reasoning traces, restating and checking)
    then:    </think>
             Answer: 44

The queried ("target") account's steps are spaced so that most of the reads the answer
depends on reach back 1,024 tokens or more; every other step touches a random other account.
Balances are two digits, mod 100. Everything is drawn from ``random.Random(seed)``:
the same seed gives the same problems.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

THINK_END = "</think>"
STYLES = ("dense", "verbose")
# Tokens a step takes in each style (SmolLM2's tokenizer, measured): used only to place the
# target's steps and to size traces; real lengths are measured after tokenizing.
TOKENS_PER_STEP = {"dense": 16, "verbose": 66}
ACCOUNTS = {"dense": 40, "verbose": 16}
RECAP_EVERY = 8  # verbose: every 8 steps, restate the balances those steps changed


@dataclass
class Step:
    index: int  # 1-based step number
    account: str
    delta: int
    prev: int  # step that last changed the account, 0 = the start balances
    before: int
    after: int


@dataclass
class Problem:
    style: str
    seed: int
    start: Dict[str, int]
    steps: List[Step]
    target: str
    prompt: str = ""
    answer: str = ""
    completion: str = ""  # the reasoning, THINK_END, the answer line: what the model writes
    # Answer-bearing reads: (char in completion where the target's balance is written again
    # from memory, chars of every earlier copy of that balance in the completion).
    target_reads: List[Tuple[int, List[int]]] = field(default_factory=list)
    all_reads: List[Tuple[int, str, List[int]]] = field(default_factory=list)  # every account's


def _name(i: int) -> str:
    letters = string.ascii_uppercase
    return letters[(i * 7) % 26] + letters[(i * 11 + i // 26) % 26]


def account_names(n: int) -> List[str]:
    names, i = [], 0
    while len(names) < n:
        name = _name(i)
        if name not in names:
            names.append(name)
        i += 1
    return names


def draw_trace_tokens(rng: random.Random) -> int:
    """Target reasoning length: median about 2,200 tokens, a tenth of 8,000-8,600."""
    if rng.random() < 0.10:
        return rng.randint(8000, 8600)
    return rng.randint(1700, 2700)


def make_problem(style: str, seed: int, trace_tokens: Optional[int] = None) -> Problem:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    rng = random.Random(f"{style}:{seed}")
    names = account_names(ACCOUNTS[style])
    target = rng.choice(names)
    others = [n for n in names if n != target]
    tokens = trace_tokens if trace_tokens is not None else draw_trace_tokens(rng)
    n_steps = max(8, tokens // TOKENS_PER_STEP[style])
    # The target's steps: gaps of 0.7x-3x of 1,024 tokens, so most reads reach >= 1,024.
    per_1024 = 1024 / TOKENS_PER_STEP[style]
    target_steps, s = set(), rng.randint(1, max(1, int(per_1024 * 0.6)))
    while s <= n_steps:
        target_steps.add(s)
        s += max(1, int(per_1024 * rng.uniform(0.7, 3.0)))
    start = {n: rng.randint(10, 99) for n in names}
    balance, last = dict(start), {n: 0 for n in names}
    steps = []
    for i in range(1, n_steps + 1):
        account = target if i in target_steps else rng.choice(others)
        delta = rng.choice([d for d in range(-9, 10) if d != 0])
        before = balance[account]
        after = (before + delta) % 100
        steps.append(Step(i, account, delta, last[account], before, after))
        balance[account], last[account] = after, i
    problem = Problem(style, seed, start, steps, target)
    problem.prompt = render_prompt(problem)
    problem.answer = f"{balance[target]:02d}"
    problem.completion, problem.target_reads = render_trace(problem)
    return problem


def _signed(d: int) -> str:
    return f"+{d}" if d > 0 else f"-{-d}"


def render_prompt(p: Problem) -> str:
    lines = [f"Ledger {p.seed}. Apply the transactions in order, working step by step; after @ each line "
             f"names the step that last changed its account (s: none, the start balance). Then give the "
             f"final balance of {p.target}.",
             "Start: " + " ".join(f"{n}={v:02d}" for n, v in p.start.items())]
    for st in p.steps:
        prev = "s" if st.prev == 0 else str(st.prev)
        lines.append(f"{st.index} {st.account}{_signed(st.delta)} @{prev}")
    lines.append(f"Question: final balance of {p.target}?")
    return "\n".join(lines) + "\n<think>\n"


class _Writer:
    """Builds a trace and records where the target's balances are written and read again."""

    def __init__(self, target: str) -> None:
        self.target, self.text = target, ""
        self.copies: Dict[str, List[int]] = {}  # account -> chars holding its current balance
        self.all_reads: List[Tuple[int, str, List[int]]] = []  # (char, account, source chars)

    @property
    def reads(self) -> List[Tuple[int, List[int]]]:
        return [(c, src) for c, acct, src in self.all_reads if acct == self.target]

    def put(self, *pieces: str, write: str = "", read: str = "", account: str = "") -> None:
        """Append ``pieces``; the piece equal to ``write``/``read`` is a write/read of ``account``."""
        for piece in pieces:
            if piece == read and read and self.copies.get(account):
                self.all_reads.append((len(self.text), account, list(self.copies[account])))
                read = ""  # one read per call
            if piece == write and write:
                self.copies.setdefault(account, []).append(len(self.text))
                write = ""
            self.text += piece

    def changed(self, account: str) -> None:
        self.copies[account] = []


def _dense_step(w: _Writer, st: Step) -> None:
    src = "s" if st.prev == 0 else str(st.prev)
    op = "+" if st.delta > 0 else "-"
    b, a = f"{st.before:02d}", f"{st.after:02d}"
    w.put(f"{st.index} {st.account} @{src} ", b, f"{op}{abs(st.delta)}=", read=b, account=st.account)
    w.changed(st.account)
    w.put(a, "\n", write=a, account=st.account)


_OPENERS = ("Step {i}: {verb} {d} {prep} {a}.", "Step {i}. The transaction {verbs} {d} {prep} account {a}.",
            "Step {i}: account {a}, {verb} {d}.")
_RECALLS = (("{a} last changed in step {p}, where it became ", "."),
            ("Looking back at step {p}, {a} was ", "."),
            ("From step {p}: {a} = ", "."))
_STARTS = ("{a} has not changed yet, so it still has its start balance {b:02d}.",
           "This is the first change to {a}; it starts at {b:02d}.")


def _verbose_step(w: _Writer, st: Step, rng: random.Random) -> None:
    add, d, a = st.delta > 0, abs(st.delta), st.account
    b_, a_ = f"{st.before:02d}", f"{st.after:02d}"
    w.put(rng.choice(_OPENERS).format(i=st.index, a=a, d=d, verb="add" if add else "subtract",
                                      verbs="adds" if add else "subtracts", prep="to" if add else "from") + " ")
    if st.prev == 0:
        w.put(rng.choice(_STARTS).format(a=a, b=st.before) + " ")
    else:
        head, tail = rng.choice(_RECALLS)
        w.put(head.format(a=a, p=st.prev), b_, tail + " ", read=b_, account=a)
    op, inv = ("+", "-") if add else ("-", "+")
    w.changed(a)
    w.put(f"So {a} is now {b_} {op} {d} = ", a_, ". ", write=a_, account=a)
    w.put(f"Check: {a_} {inv} {d} = {b_}, right. {a} = ", a_, ".\n", write=a_, account=a)


def render_trace(p: Problem) -> Tuple[str, List[Tuple[int, List[int]]]]:
    """The reasoning (ending with THINK_END) and the target's reads: (char, source chars)."""
    w = _Writer(p.target)
    if p.style == "dense":
        for st in p.steps:
            _dense_step(w, st)
    else:
        rng = random.Random(f"phrasing:{p.seed}")
        changed: Dict[str, int] = {}
        for st in p.steps:
            _verbose_step(w, st, rng)
            changed[st.account] = st.after
            if st.index % RECAP_EVERY == 0:
                w.put(f"Recap after step {st.index}:")
                for i, (acct, value) in enumerate(changed.items()):
                    v = f"{value:02d}"
                    w.put(f"{',' if i else ''} {acct} = ", v, write=v, account=acct)
                w.put(".\n")
                changed = {}
        w.put(f"All {len(p.steps)} steps done.\n")
    w.put(THINK_END + "\nAnswer: ")
    w.put(p.answer, read=p.answer, account=p.target)
    p.all_reads = w.all_reads
    return w.text, w.reads


@dataclass
class FollowUp:
    """A second turn: the final balance of another account, asked after the first reply.

    The prompt holds only start balances and deltas, so the balance lives in the first reply's
    reasoning alone: the model finds the account's last step in the prompt's transaction list
    and reads the balance that step wrote back from its own (possibly compressed) trace."""

    account: str
    prompt: str  # sent after the first reply and its end-of-turn token
    completion: str  # short reasoning, THINK_END, the answer line
    answer: str


def make_follow_up(p: Problem) -> FollowUp:
    rng = random.Random(f"follow-up:{p.style}:{p.seed}")
    last_step = {st.account: st for st in p.steps if st.account != p.target}
    if last_step:
        account = rng.choice(sorted(last_step))
        st = last_step[account]
        answer = f"{st.after:02d}"
        thought = f"{account} last changed in step {st.index}, where it became {answer}."
    else:  # no other account changed (never drawn at the task's lengths; kept total)
        account = rng.choice(sorted(n for n in p.start if n != p.target))
        answer = f"{p.start[account]:02d}"
        thought = f"{account} never changed, so it keeps its start balance {answer}."
    prompt = f"\nQuestion: final balance of {account}?\n<think>\n"
    return FollowUp(account, prompt, f"{thought}\n{THINK_END}\nAnswer: {answer}", answer)


def problems(style: str, n: int, seed0: int) -> List[Problem]:
    """``n`` problems of one style with seeds ``seed0 .. seed0 + n - 1``."""
    return [make_problem(style, seed0 + i) for i in range(n)]


def extract_answer(text: str) -> Optional[str]:
    """The two digits after the last 'Answer:' (None if the model never wrote one)."""
    at = text.rfind("Answer:")
    if at < 0:
        return None
    digits = "".join(ch for ch in text[at + 7:at + 12] if ch.isdigit())
    return digits[:2] if len(digits) >= 2 else None
