"""Issue 19's next-turn accuracy run (benchmarks/reasoning/follow_up.py) against a real SGLang
HTTP server with Kara on the CPU: both arms send the same tokens, the continued arm's second
turn prefills only the question, the history arm's prefills the compressed reply again, and the
training rows (train.token_rows) put the loss on what the model writes in both turns.

The tiny random model cannot do the task: this checks the plumbing, not accuracy (that is a GPU
run of a model trained with ``train.py --follow-ups``).
"""

import json
import sys
from pathlib import Path

import pytest

from support.engines import use_cpu_sglang

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "reasoning"))
pytestmark = [pytest.mark.sglang, pytest.mark.newest_release]  # a client of the server

use_cpu_sglang()


@pytest.fixture(scope="module")
def server(kara_http_server):
    # Two conversations at once: a row for each open session and one for each running turn
    # (the session server has streaming sessions on and four running requests).
    return kara_http_server  # --kv-policy kara, W = 32, U = 8 (tests/conftest.py)


def test_training_rows_label_both_replies_and_neither_question(tiny_model):
    import ledger
    import train
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    p = ledger.make_problem("dense", 12345, trace_tokens=200)
    f = ledger.make_follow_up(p)
    eos = 0
    ids, labels = train.token_rows(tokenizer, p, eos, follow_up=True)
    pieces = [tokenizer(t).input_ids for t in (p.prompt, p.completion, f.prompt, f.completion)]
    expected = pieces[0] + pieces[1] + [eos] + pieces[2] + pieces[3] + [eos]
    assert ids == expected
    masked = [i for i, label in enumerate(labels) if label == -100]
    n0, n1, n2 = len(pieces[0]), len(pieces[1]) + 1, len(pieces[2])
    assert masked == list(range(n0)) + list(range(n0 + n1, n0 + n1 + n2))
    assert [label for label in labels if label != -100] == pieces[1] + [eos] + pieces[3] + [eos]
    single_ids, _ = train.token_rows(tokenizer, p, eos, follow_up=False)
    assert single_ids == pieces[0] + pieces[1] + [eos]


def test_both_arms_send_the_same_first_turn_and_only_the_continued_one_skips_the_reply(server, tiny_model, tmp_path):
    import follow_up
    import ledger
    from transformers import AutoTokenizer

    base, _, _ = server
    rows, records = {}, {}
    for arm in ("history", "continue"):
        out = tmp_path / f"{arm}.json"
        rows[arm] = follow_up.main(["--url", base, "--model", str(tiny_model), "--arm", arm, "--style", "dense",
                                    "--n", "2", "--concurrency", "2", "--max-new-tokens", "120",
                                    "--out", str(out), "--records", str(tmp_path / f"{arm}.jsonl")])
        assert json.loads(out.read_text()) == rows[arm]
        records[arm] = [json.loads(line) for line in (tmp_path / f"{arm}.jsonl").read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    for hist, cont in zip(records["history"], records["continue"]):
        assert hist["seed"] == cont["seed"] and hist["account"] == cont["account"]
        # The same request, greedy (the second arm finds the prompt in the radix tree).
        same = lambda turn: {k: v for k, v in turn.items() if k != "prefilled"}  # noqa: E731
        assert same(hist["turn1"]) == same(cont["turn1"]) and hist["got1"] == cont["got1"]
        reply = hist["turn1"]["completion_tokens"]
        assert hist["turn1"]["kv_held"] < hist["turn1"]["prompt_tokens"] + reply  # turn 1 compressed
        question = len(tokenizer(ledger.make_follow_up(ledger.make_problem("dense", hist["seed"])).prompt).input_ids)
        # Continued: the question, plus turn 1's last token (sampled, never run through the model).
        assert cont["turn2"]["prefilled"] == question + 1, (cont, question)
        # History on a Kara server: the compressed reply cannot be in the radix tree (only its
        # exact prefix, a couple of tokens here), so it is prefilled again.
        assert hist["turn2"]["prefilled"] > reply, hist
        assert cont["turn2"]["kv_held"] < hist["turn2"]["kv_held"]
    for arm, row in rows.items():
        assert row["n"] == 2 and row["arm"] == arm and row["server"]["kv_policy"] == "kara", row
        assert row["turn2_prefilled_mean"] == pytest.approx(
            sum(r["turn2"]["prefilled"] for r in records[arm]) / 2, abs=0.05)


def test_the_next_turn_split_uses_the_reply_and_kara_s_schedule(tiny_model):
    import ledger
    import report_follow_up
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    problem = ledger.make_problem("dense", 7)
    account = problem.steps[-1].account
    back = report_follow_up.tokens_back(tokenizer, problem, account)
    # The model's own reply, when recorded, is measured instead of the reference.
    assert report_follow_up.tokens_back(tokenizer, problem, account, problem.completion) == back
    longer = problem.completion.replace(ledger.THINK_END, "All checked twice.\n" + ledger.THINK_END)
    assert report_follow_up.tokens_back(tokenizer, problem, account, longer) > back
    assert report_follow_up.tokens_back(tokenizer, problem, account, "no steps here") is None
    # Kara's tail at the end of an n-token reply is its last U .. W + U - 1 tokens: "within
    # W + U of the end" is not "never compressed".
    W, U = 512, 64
    assert report_follow_up.in_uncompressed_tail(50, 600, W, U)          # 600 tokens: 512 compressed, 88 whole
    assert not report_follow_up.in_uncompressed_tail(100, 600, W, U)     # 100 back is compressed there
    assert report_follow_up.in_uncompressed_tail(500, 1599, W, U)        # 1599: 1024 compressed, 575 whole
    assert report_follow_up.in_uncompressed_tail(575, 575, W, U)         # shorter than W + U: nothing compressed
