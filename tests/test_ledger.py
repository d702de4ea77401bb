"""The ledger reasoning task (benchmarks/reasoning): what its measurements rely on.

The answer follows from the prompt alone by the task's rules (so the model can learn it), but
only through the intermediate balances the trace writes; the reads the properties count point
at earlier copies of the same value; the first-error parser sees a reference as all right and
a changed recall as a recall mistake. Six fixed problem seeds (each test's id names its seed).
"""

import random
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "reasoning"))
import first_error  # noqa: E402
import ledger  # noqa: E402

_rng = random.Random(20261203)
SEEDS = [_rng.randrange(10**6) for _ in range(6)]


def balances_after_all_steps(prompt: str) -> dict:
    """Every account's final balance, by the rules stated in the prompt."""
    balance = {name: int(v) for name, v in re.findall(r"(\w\w)=(\d\d)", prompt.split("\n")[1])}
    for _, account, sign, amount, _ in re.findall(r"^(\d+) (\w\w)([+-])(\d) @(\w+)$", prompt, re.M):
        balance[account] = (balance[account] + (int(amount) if sign == "+" else -int(amount))) % 100
    return balance


def solve_from_prompt(prompt: str) -> str:
    """The final balance asked for."""
    target = re.search(r"final balance of (\w\w)\?", prompt)[1]
    return f"{balances_after_all_steps(prompt)[target]:02d}"


@pytest.mark.parametrize("style", ledger.STYLES)
@pytest.mark.parametrize("seed", SEEDS)
def test_problem_is_deterministic_and_its_answer_follows_from_the_prompt(style, seed):
    p = ledger.make_problem(style, seed)
    again = ledger.make_problem(style, seed)
    assert (p.prompt, p.completion) == (again.prompt, again.completion)
    assert solve_from_prompt(p.prompt) == p.answer
    assert p.completion.endswith(f"{ledger.THINK_END}\nAnswer: {p.answer}")
    # No balance after the start is in the prompt: the prompt lines carry amounts and pointers.
    assert all(re.fullmatch(r"\d+ \w\w[+-]\d @(\d+|s)", line) for line in p.prompt.split("\n")[2:-3])


@pytest.mark.parametrize("style", ledger.STYLES)
@pytest.mark.parametrize("seed", SEEDS)
def test_reads_point_back_to_copies_of_the_same_value(style, seed):
    p = ledger.make_problem(style, seed)
    assert p.target_reads, "every problem has at least its answer read"
    for char, sources in p.target_reads:
        value = p.completion[char:char + 2]
        assert sources and all(c < char and p.completion[c:c + 2] == value for c in sources)
    # The answer is the last read of the queried balance.
    assert p.target_reads[-1][0] == len(p.completion) - 2


@pytest.mark.parametrize("style", ledger.STYLES)
def test_first_error_parser_finds_a_changed_recall(style):
    p = ledger.make_problem(style, SEEDS[0])
    assert first_error.classify(p, p.completion) == ("answer", None)
    step = next(st for st in p.steps if st.prev > 0)
    char = next(c for c, acct, _ in p.all_reads if acct == step.account and c > p.completion.find(
        f"\n{step.index} " if style == "dense" else f"Step {step.index}"))
    wrong = f"{(step.before + 1) % 100:02d}"
    corrupted = p.completion[:char] + wrong + p.completion[char + 2:]
    if style == "verbose":  # the balance the step computes from is the one in its "So ..." sentence
        at = corrupted.find(f"So {step.account} is now ", char)
        corrupted = corrupted[:at] + corrupted[at:].replace(f"is now {step.before:02d}", f"is now {wrong}", 1)
    kind, where = first_error.classify(p, corrupted)
    assert kind == "recall" and where.index == step.index


@pytest.mark.parametrize("style", ledger.STYLES)
@pytest.mark.parametrize("seed", SEEDS)
def test_follow_up_asks_another_account_whose_balance_only_the_first_reply_wrote(style, seed):
    p = ledger.make_problem(style, seed)
    f = ledger.make_follow_up(p)
    assert f == ledger.make_follow_up(ledger.make_problem(style, seed))
    assert f.account != p.target
    assert f.answer == f"{balances_after_all_steps(p.prompt)[f.account]:02d}"
    assert f.prompt == f"\nQuestion: final balance of {f.account}?\n<think>\n"
    assert f.completion.endswith(f"{ledger.THINK_END}\nAnswer: {f.answer}")
    # The step the follow-up names is the account's last in the prompt, and the first reply
    # wrote the balance there: the answer is a read of the first turn's reasoning.
    step = int(re.search(r"last changed in step (\d+),", f.completion)[1])
    lines = re.findall(r"^(\d+) (\w\w)[+-]\d @\w+$", p.prompt, re.M)
    assert max(int(i) for i, account in lines if account == f.account) == step
    text = "\n" + p.completion
    start = re.search(rf"\nStep {step}[:.]" if style == "verbose" else rf"\n{step} {f.account} @", text).start()
    line = text[start:text.index("\n", start + 1)]
    assert line.endswith(f"={f.answer}") if style == "dense" else f"{f.account} = {f.answer}." in line, line


@pytest.mark.parametrize("style", ledger.STYLES)
def test_first_error_positions_come_from_the_reply_itself(style):
    p = ledger.make_problem(style, SEEDS[0])
    step = next(st for st in p.steps if st.prev > 0 and st.index > 8)
    # On a reply that is the reference, the reply's read, nearest copy and computing step are
    # the reference writer's own read and copies.
    read, nearest, first = first_error.reply_positions(style, p.completion, step)
    start = p.completion.find(f"\n{step.index} ") if style == "dense" else p.completion.find(f"Step {step.index}:")
    if style == "verbose" and start < 0:
        start = p.completion.find(f"Step {step.index}.")
    ref_read, sources = next((c, src) for c, acct, src in p.all_reads if acct == step.account and c > start)
    assert (read, nearest, first) == (ref_read, max(c for c in sources if c < ref_read), min(sources))
    # A reply that wrote something else first: its positions move with its own text.
    pad = "Let me begin.\n"
    assert first_error.reply_positions(style, pad + p.completion, step) == (
        read + len(pad), nearest + len(pad), first + len(pad))
    # Without the pointed-to step's line there is nothing to measure in the reply.
    lines = p.completion.split("\n")
    gone = [ln for ln in lines if not (ln.startswith(f"{step.prev} ") or ln.startswith(f"Step {step.prev}:")
                                       or ln.startswith(f"Step {step.prev}."))]
    assert first_error.reply_positions(style, "\n".join(gone), step) is None
