"""A KV-bound multi-turn agent workload through real SGLang (issue 19, item 3): conversations
per minute, and per turn the prompt tokens prefilled again, TTFT and the KV each conversation
holds.

    python benchmarks/agent/bench_agent.py --policy kara --keep-ratio 0.25 --out row.json \\
        --conversations 96 --turns 4 --system-len 1024 --reply-len 4096 --tool-len 256

Every conversation starts at once and runs its turns one after another, as an agent loop with
interleaved thinking does through an OpenAI-style API: turn 1's prompt is a system prompt
shared by all conversations plus a task of its own; each later turn's prompt is the previous
prompt + the whole reply (thinking kept) + a tool output. Replies are ``--reply-len`` tokens
(``ignore_eos``), tool outputs random ids. Per turn it records SGLang's ``cached_tokens``
(prefix-cache hits), the tokens prefilled (prompt - cached), TTFT, and the KV the request held
at its end (Kara's ``kv_tokens_kept``; prompt + reply on a server without a policy). The
server's settings and model (Llama-3.1-8B shape, dummy weights) are bench_serving.py's.

``--session-continue`` runs each conversation as a streaming session that continues on its
compressed KV (``custom_params: {"kara_session_continue": true}``): each later turn sends only
the tool output, and its prompt (as SGLang reports it) is the conversation in KV space.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench_serving import (add_server_args, kara_counters, percentile, random_ids, start_engine,  # noqa: E402
                           stream_chunks)
from model_shapes import SHAPES  # noqa: E402


def shape_ids(rng, n: int, args) -> list:
    """``n`` random token ids inside the vocabulary of the run's ``--model-shape``."""
    return random_ids(rng, n, SHAPES[args.model_shape].config["vocab_size"])


async def one_turn(engine, ids, sampling, session_params=None) -> dict:
    start = time.perf_counter()
    first, out, meta = None, [], {}
    async for chunk in stream_chunks(engine, ids, sampling, session_params):
        meta = chunk["meta_info"]
        if chunk["output_ids"] and first is None:
            first = time.perf_counter() - start
        out.extend(chunk["output_ids"])
    kept = (meta.get("kv_tokens_kept") or [None])[-1]
    # A session turn's prompt is built by the server (in KV space when it continues).
    prompt = meta.get("prompt_tokens", len(ids)) if session_params else len(ids)
    return {"prompt_tokens": prompt, "cached_tokens": meta.get("cached_tokens", 0),
            "prefilled": prompt - meta.get("cached_tokens", 0), "ttft": first,
            "latency": time.perf_counter() - start, "reply_tokens": len(out),
            "kv_held": kept if kept is not None else prompt + len(out), "output_ids": out}


async def conversation(engine, system, rng, args, sampling, gate, record, finished_at, t0):
    async with gate:
        history = system + shape_ids(rng, args.task_len, args)
        session = await open_session(engine) if args.session_continue else None
        for turn in range(args.turns):
            if session is None:
                result = await one_turn(engine, history, sampling)
                history = history + result.pop("output_ids") + shape_ids(rng, args.tool_len, args)
            else:  # the session holds the conversation: send only what is new
                result = await one_turn(engine, history, sampling, {"id": session})
                result.pop("output_ids")
                history = shape_ids(rng, args.tool_len, args)
            record.append({"turn": turn, **result})
            # A run stopped by its time limit keeps its finished turns in the log.
            print("AGENT-TURN " + json.dumps(record[-1]), file=sys.stderr, flush=True)
        if session is not None:
            await close_session(engine, session)
        finished_at.append(time.perf_counter() - t0)


async def open_session(engine) -> str:
    from sglang.srt.managers.io_struct import OpenSessionReqInput

    sid = f"agent-{random.getrandbits(48):012x}"
    await engine.tokenizer_manager.open_session(
        OpenSessionReqInput(capacity_of_str_len=1 << 30, session_id=sid, streaming=True), None)
    return sid


async def close_session(engine, sid: str) -> None:
    from sglang.srt.managers.io_struct import CloseSessionReqInput

    await engine.tokenizer_manager.close_session(CloseSessionReqInput(session_id=sid), None)


async def run(engine, args, seed: int = 0):
    rng = random.Random(seed)
    system = shape_ids(rng, args.system_len, args)
    sampling = {"temperature": 0, "max_new_tokens": args.reply_len, "ignore_eos": True}
    if args.session_continue:
        sampling["custom_params"] = {"kara_session_continue": True}
    gate = asyncio.Semaphore(args.concurrency or args.conversations)
    record, finished_at = [], []
    t0 = time.perf_counter()
    await asyncio.gather(*(conversation(engine, system, random.Random(i + 1), args, sampling, gate, record,
                                        finished_at, t0) for i in range(args.conversations)))
    return time.perf_counter() - t0, record, finished_at


def per_turn(record, turns):
    rows = []
    for turn in range(turns):
        rs = [r for r in record if r["turn"] == turn]
        ttfts = [r["ttft"] for r in rs if r["ttft"] is not None]
        rows.append({
            "turn": turn + 1, "n": len(rs),
            "prompt_tokens_mean": statistics.fmean(r["prompt_tokens"] for r in rs),
            "cached_tokens_mean": statistics.fmean(r["cached_tokens"] for r in rs),
            "prefilled_mean": statistics.fmean(r["prefilled"] for r in rs),
            "reply_tokens_mean": statistics.fmean(r["reply_tokens"] for r in rs),
            "kv_held_mean": statistics.fmean(r["kv_held"] for r in rs),
            "ttft_mean_s": statistics.fmean(ttfts), "ttft_p99_s": percentile(ttfts, 99),
            "latency_mean_s": statistics.fmean(r["latency"] for r in rs),
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    add_server_args(ap)
    ap.add_argument("--conversations", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=None, help="conversations in flight (default: all)")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--system-len", type=int, default=1024, help="system prompt, shared by every conversation")
    ap.add_argument("--task-len", type=int, default=128, help="each conversation's own first message")
    ap.add_argument("--reply-len", type=int, default=4096, help="tokens of each reply (thinking + answer)")
    ap.add_argument("--tool-len", type=int, default=256, help="tool output appended after each reply")
    ap.add_argument("--warmup-conversations", type=int, default=4)
    ap.add_argument("--session-continue", action="store_true",
                    help="streaming sessions that continue on compressed KV (kara_session_continue)")
    args = ap.parse_args()
    in_flight = min(args.conversations, args.concurrency or args.conversations)
    if args.session_continue and args.max_running_requests < 2 * in_flight:
        # Each open streaming session holds one of SGLang's max_running_requests + 1 request
        # rows until it closes, and SGLang 0.5.17 admits a turn only while a row is free, even
        # a turn that runs on its session's row: with fewer rows, later turns queue for rows
        # (and with none free, 0.5.23 admits no turn at all).
        ap.error(f"--session-continue with {in_flight} conversations in flight needs "
                 f"--max-running-requests >= {2 * in_flight} (a row per open session + one per running turn)")
    engine, env, startup = start_engine(args, **({"enable_streaming_session": True} if args.session_continue else {}))
    loop = engine.loop  # the tokenizer manager's receive loop runs on the engine's own loop
    warm = argparse.Namespace(**{**vars(args), "conversations": args.warmup_conversations, "concurrency": None,
                                 "turns": 2, "reply_len": min(args.reply_len, 640)})
    # JIT and compression kernels, not recorded; its own seed, so no measured prompt is ever
    # one of its prompts.
    loop.run_until_complete(run(engine, warm, seed=1))
    for _ in range(100):  # refused while the scheduler still finishes (a closed session's release)
        if engine.flush_cache().success:
            break
        time.sleep(0.1)
    before = kara_counters(engine)
    print("BENCH-START agent", file=sys.stderr, flush=True)
    wall, record, finished_at = loop.run_until_complete(run(engine, args))
    print("BENCH-END agent", file=sys.stderr, flush=True)
    after = kara_counters(engine)
    produced = sum(r["reply_tokens"] for r in record)
    row = {
        "policy": args.policy if args.policy != "none" else "vanilla", "keep_ratio": args.keep_ratio,
        "window": args.window if args.policy != "none" else None,
        "buffer": args.buffer if args.policy != "none" else None,
        "session_continue": args.session_continue, "conversations": args.conversations, "concurrency": args.concurrency, "turns": args.turns,
        "system_len": args.system_len, "task_len": args.task_len, "reply_len": args.reply_len,
        "tool_len": args.tool_len, "wall_s": wall,
        "conversations_per_min": 60 * args.conversations / wall,
        "output_tok_per_s": produced / wall,
        "prefilled_total": sum(r["prefilled"] for r in record),
        "reply_tokens_total": produced,
        "compression_events": after["compression_events"] - before["compression_events"],
        "startup_s": startup, "per_turn": per_turn(record, args.turns),
        "first_conversation_done_s": min(finished_at), **env,
    }
    with open(args.out, "w") as f:
        json.dump(row, f, indent=1)
    print(json.dumps({k: v for k, v in row.items() if k != "per_turn"}), flush=True)
    for t in row["per_turn"]:
        print(json.dumps(t), flush=True)
    engine.shutdown()


if __name__ == "__main__":
    main()
