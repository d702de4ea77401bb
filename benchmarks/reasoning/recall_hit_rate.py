"""How often a recall buffer already holds what the next step picks, on a real model.

The throughput waves run dummy weights, whose random queries renew nearly every pick every
step: the buffer writes there are the worst case. This runs a real model through SGLang with
the recall tier and reads the server's counters (``recall_buffer_picks``, ``_written``):
the hit rate is the share of picks (per layer and KV head, each step) already in the buffer.

    python benchmarks/reasoning/recall_hit_rate.py                      # SmolLM2-135M on the CPU
    python benchmarks/reasoning/recall_hit_rate.py --device cuda --model M --window 512 \
        --buffer 64 --recall-tokens 256 --pages 16 --max-new-tokens 8000

Greedy, ``ignore_eos``; the prompts are the fidelity tasks (benchmarks/fidelity/free_running.py).
Prints one JSON row per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks" / "fidelity"))


def hit_rate(state: dict) -> float:
    picks, written = state["recall_buffer_picks"], state["recall_buffer_picks_written"]
    return 1.0 - written / picks if picks else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "data" / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--max-new-tokens", type=int, default=700)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--buffer", type=int, default=32)
    ap.add_argument("--keep-ratio", type=float, default=0.25)
    ap.add_argument("--recall-tokens", type=int, default=64)
    ap.add_argument("--pages", type=int, nargs="+", default=[0, 4], help="--kara-recall-pages settings to run")
    ap.add_argument("--tasks", type=int, default=4, help="how many of the fidelity tasks")
    args = ap.parse_args()

    if args.device == "cuda":
        os.environ["KARA_TEST_DEVICE"] = "cuda"  # support.engines: SGLang's GPU defaults
    from free_running import TASKS
    from support.engines import make_engine, pool_state, use_cpu_sglang
    from transformers import AutoTokenizer

    use_cpu_sglang()
    os.environ.pop("KARA_DEBUG_CHECKS", None)  # a measurement, not a test: no per-step checks
    tok = AutoTokenizer.from_pretrained(args.model)
    prompts = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
               for t in list(TASKS.values())[:args.tasks]]
    for pages in args.pages:
        t0 = time.perf_counter()
        engine = make_engine(args.model, max_total_tokens=40000, kv_policy="kara", kara_window=args.window,
                             kara_buffer=args.buffer, kara_keep_ratio=args.keep_ratio,
                             kara_recall_tokens=args.recall_tokens, kara_recall_kv="bits4",
                             kara_recall_tier_tokens=len(prompts) * args.max_new_tokens, kara_recall_pages=pages)
        try:
            engine.generate(prompts, {"temperature": 0, "max_new_tokens": args.max_new_tokens, "ignore_eos": True})
            state = pool_state(engine)
        finally:
            engine.shutdown()
        print(json.dumps({"model": Path(args.model).name, "device": args.device, "window": args.window,
                          "buffer": args.buffer, "keep_ratio": args.keep_ratio, "recall_tokens": args.recall_tokens,
                          "recall_pages": pages, "requests": len(prompts), "max_new_tokens": args.max_new_tokens,
                          "buffer_fills": state["recall_buffer_fills"], "picks": state["recall_buffer_picks"],
                          "picks_written": state["recall_buffer_picks_written"],
                          "hit_rate": round(hit_rate(state), 4), "wall_s": round(time.perf_counter() - t0, 1)}),
              flush=True)


if __name__ == "__main__":
    main()
