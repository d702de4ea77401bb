"""Next-turn accuracy on the ledger task (issue 19): does a second turn answer the same when the
first turn's reasoning was compressed and the conversation continues on that compressed KV?

    python benchmarks/reasoning/follow_up.py --url http://127.0.0.1:30000 --model DIR \\
        --arm continue --style verbose --n 500 --out rows.json [--records records.jsonl]

Each held-out problem (seeds from train.EVAL_SEED0) is a two-turn conversation: the ledger
question, the model's reply (reasoning + answer), then ledger.make_follow_up's question about
another account, whose balance lives only in the first reply's reasoning. Greedy decoding.
Every turn is sent as token ids, so every arm sees the same tokens:

- ``history``: turn 2 is a plain request whose prompt is turn 1's prompt + reply + question.
  On a server without a policy the radix tree serves the history from cache (vanilla); on a
  Kara server the compressed reply cannot be in the tree, so it is prefilled again, exactly.
- ``continue``: the conversation is a streaming session with ``kara_session_continue``: turn 2
  sends only the question and runs on the compressed KV turn 1 left (server flags:
  ``--enable-streaming-session``, a policy, and one request row per open session + one per
  running turn: ``--max-running-requests`` >= 2 x ``--concurrency``).

The row: turn-1 and turn-2 accuracy, turn 2's accuracy among the problems turn 1 got right,
the tokens turn 2 prefilled, and the KV each turn held at its end. Model needed: one trained
with ``train.py --follow-ups``; any model runs the plumbing (``--max-new-tokens`` caps turn 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ledger  # noqa: E402
from train import CONTEXT, EOS, EVAL_SEED0  # noqa: E402

FOLLOW_UP_TOKENS = 64  # the second turn's reasoning is one sentence


def post(url: str, payload: dict, timeout: float = 3600):
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"{url}: HTTP {err.code}: {err.read()[:500]!r}") from None
    return json.loads(body) if body else None


def generate(url: str, ids: List[int], max_new_tokens: int, session: Optional[str]) -> dict:
    sampling = {"temperature": 0.0, "max_new_tokens": max_new_tokens}
    payload = {"input_ids": ids, "sampling_params": sampling}
    if session is not None:
        payload["session_params"] = {"id": session}
        sampling["custom_params"] = {"kara_session_continue": True}  # per request, in sampling_params
    out = post(url + "/generate", payload)
    if "output_ids" not in out:
        raise RuntimeError(f"/generate returned no output_ids: {str(out)[:300]}")
    return out


def last(meta: dict, key: str):
    value = meta.get(key)
    return value[-1] if isinstance(value, list) and value else value


def turn_record(out: dict, prompt_len: int) -> dict:
    meta = out["meta_info"]
    prompt = meta.get("prompt_tokens", prompt_len)
    kept = last(meta, "kv_tokens_kept")
    return {"prompt_tokens": prompt, "prefilled": prompt - meta.get("cached_tokens", 0),
            "completion_tokens": len(out["output_ids"]),
            "kv_held": kept if kept is not None else prompt + len(out["output_ids"]),
            "finish": (meta.get("finish_reason") or {}).get("type")}


def converse(url: str, tokenizer, eos_id: int, problem: ledger.Problem, arm: str, max_new_tokens: int) -> dict:
    second = ledger.make_follow_up(problem)
    prompt_ids = tokenizer(problem.prompt).input_ids
    question_ids = tokenizer(second.prompt).input_ids
    session = post(url + "/open_session", {"capacity_of_str_len": 1 << 30, "streaming": True}) \
        if arm == "continue" else None
    try:
        # Both turns live in one context: turn 1 leaves room for the question and its answer.
        room = CONTEXT - len(prompt_ids) - len(question_ids) - FOLLOW_UP_TOKENS - 1
        first = generate(url, prompt_ids, min(max_new_tokens, room), session)
        reply = list(first["output_ids"])
        if (first["meta_info"].get("finish_reason") or {}).get("type") == "stop" and reply[-1:] != [eos_id]:
            # Training put the end-of-turn token between the turns; should a server leave the
            # matched stop token out of output_ids (and its session), the question brings it.
            question_ids = [eos_id] + question_ids
        if arm == "continue":
            turn2 = generate(url, question_ids, FOLLOW_UP_TOKENS, session)
        else:
            # What a session holds: the prompt, the reply as generated (its end-of-turn token
            # included; none when max_new_tokens cut it), then the question.
            turn2 = generate(url, prompt_ids + reply + question_ids, FOLLOW_UP_TOKENS, None)
    finally:
        if session is not None:
            post(url + "/close_session", {"session_id": session})
    text1, text2 = tokenizer.decode(reply), tokenizer.decode(turn2["output_ids"])
    got1, got2 = ledger.extract_answer(text1), ledger.extract_answer(text2)
    return {"seed": problem.seed, "account": second.account,
            "answer1": problem.answer, "got1": got1, "correct1": got1 == problem.answer,
            "answer2": second.answer, "got2": got2, "correct2": got2 == second.answer,
            "turn1": turn_record(first, len(prompt_ids)),
            "turn2": turn_record(turn2, len(prompt_ids) + len(reply) + len(question_ids)),
            "text1": text1, "text2": text2}


def summarize(records: List[dict], arm: str, style: str, server: dict) -> dict:
    n = len(records)
    right1 = [r for r in records if r["correct1"]]
    mean = lambda xs: round(statistics.fmean(xs), 1) if xs else None  # noqa: E731
    return {
        "arm": arm, "style": style, "n": n, "server": server,
        "turn1_accuracy": round(len(right1) / n, 4),
        "turn2_accuracy": round(sum(r["correct2"] for r in records) / n, 4),
        "turn2_accuracy_given_turn1_right": round(sum(r["correct2"] for r in right1) / len(right1), 4) if right1 else None,
        "turn2_prefilled_mean": mean([r["turn2"]["prefilled"] for r in records]),
        "turn2_prompt_tokens_mean": mean([r["turn2"]["prompt_tokens"] for r in records]),
        "turn1_kv_held_mean": mean([r["turn1"]["kv_held"] for r in records]),
        "turn2_kv_held_mean": mean([r["turn2"]["kv_held"] for r in records]),
        "turn1_cut_by_max_new_tokens": sum(r["turn1"]["finish"] == "length" for r in records),
    }


def main(argv: Optional[List[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--model", required=True, help="the served model's folder (its tokenizer)")
    ap.add_argument("--arm", choices=("history", "continue"), required=True)
    ap.add_argument("--style", choices=ledger.STYLES, default="verbose")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seed0", type=int, default=EVAL_SEED0, help="first problem seed (held-out from here)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=16384, help="turn 1's cap")
    ap.add_argument("--label", default="", help="recorded in the row: the server's flags, say")
    ap.add_argument("--out", required=True)
    ap.add_argument("--records", help="per-problem JSONL")
    a = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from kara_sglang.accuracy.client import probe_server

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    # The trained reasoner ends its turns with train.EOS; other models (the tests' tiny one) with their own.
    eos_id = tokenizer.convert_tokens_to_ids(EOS) if EOS in tokenizer.get_vocab() else tokenizer.eos_token_id
    url = a.url.rstrip("/")
    info = json.loads(urllib.request.urlopen(url + "/server_info", timeout=60).read())
    server = {k: info.get(k) for k in ("enable_streaming_session", "attention_backend", "page_size", "version")}
    # The plugin's policy (None on a server without it); its settings are the launch flags.
    server["kv_policy"] = probe_server(url).kv_policy
    server["label"] = a.label
    problems = [ledger.make_problem(a.style, a.seed0 + i) for i in range(a.n)]
    records = []
    # Each record is written as it completes: a run cut short (a lent GPU's time running out)
    # still leaves every conversation it finished.
    with ThreadPoolExecutor(a.concurrency) as pool, open(a.records or os.devnull, "w") as sink:
        futures = [pool.submit(converse, url, tokenizer, eos_id, p, a.arm, a.max_new_tokens) for p in problems]
        for future in as_completed(futures):
            records.append(future.result())
            sink.write(json.dumps(records[-1]) + "\n")
            sink.flush()
    records.sort(key=lambda r: r["seed"])
    if a.records:  # complete: in problem order
        Path(a.records).write_text("".join(json.dumps(r) + "\n" for r in records))
    row = summarize(records, a.arm, a.style, server)
    Path(a.out).write_text(json.dumps(row, indent=1))
    print(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
