"""Multi-turn agent workload through the real server: what compressing a reply costs the next turn.

    python benchmarks/agent/multi_turn.py --out docs/results/agent.json

Each conversation runs several turns; every reply is ``thinking + </think> + answer`` (teacher
forced, so every policy sees exactly the same tokens), and the next turn's prompt is the old
prompt plus the reply plus a new tool output, in one of two template styles:

- ``keep``: the history keeps the thinking (interleaved-thinking agents);
- ``drop``: the history keeps only the answer (templates that strip earlier ``<think>`` blocks).

Per turn it records SGLang's own ``cached_tokens`` (prefix-cache hits), the prompt tokens
prefilled again, and the KV each reply holds at its end (measured by the forcing processor),
for vanilla, Kara compressing every decoded token (``--kara-scope all``) and Kara compressing
only the thinking (``--kara-scope reasoning``). The model is the tiny random one from
``kara_sglang.demo_model`` (hit ratios and KV do not depend on the weights), on the CPU.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks" / "fidelity"))

POLICIES = {
    "vanilla": {},
    "kara-all": dict(kv_policy="kara", kara_scope="all"),
    "kara-reasoning": dict(kv_policy="kara", kara_scope="reasoning"),
}


def conversation_turns(rng, turns, system, think, answer, tool, marker):
    ids = lambda n: [rng.randrange(10, 500) for _ in range(n)]  # noqa: E731
    first = ids(system)
    return first, [(ids(think), ids(answer), ids(tool)) for _ in range(turns)]


def run(policy: str, style: str, args, model: str) -> dict:
    from support.engines import make_engine
    from teacher_forcing import importable, teacher_forced
    from transformers import AutoTokenizer

    marker = AutoTokenizer.from_pretrained(model).encode("</think>", add_special_tokens=False)
    rng = random.Random(args.seed)
    convs = [conversation_turns(rng, args.turns, args.system, args.think, args.answer, args.tool, marker)
             for _ in range(args.conversations)]
    importable()
    kara = dict(POLICIES[policy])
    if kara:
        kara.update(kara_window=args.window, kara_buffer=args.buffer, kara_keep_ratio=args.keep, kara_chunk_size=2)
    engine = make_engine(model, reasoning_parser="deepseek-r1", enable_custom_logit_processor=True,
                         max_total_tokens=60000, **kara)
    prompts = [first for first, _ in convs]
    per_turn = []
    t0 = time.perf_counter()
    try:
        for turn in range(args.turns):
            requests = [{"input_ids": p, "forced": think + marker + answer}
                        for p, (_, steps) in zip(prompts, convs) for think, answer, _ in [steps[turn]]]
            outs, records = teacher_forced(engine, requests)
            prompt_tokens = sum(o["meta_info"]["prompt_tokens"] for o in outs)
            cached = sum(o["meta_info"]["cached_tokens"] for o in outs)
            kv_at = lambda step: step["kv"] if step["kv"] is not None else step["len"]  # noqa: E731
            kv_end = [kv_at(r[-1]) for r in records]
            kv_peak = [max(kv_at(step) for step in r) for r in records]
            per_turn.append({"turn": turn + 1, "prompt_tokens": prompt_tokens, "cached_tokens": cached,
                             "hit_ratio": cached / prompt_tokens, "prefilled": prompt_tokens - cached,
                             "reply_kv_at_end": sum(kv_end), "reply_kv_peak": sum(kv_peak),
                             "reply_tokens": sum(len(r["forced"]) for r in requests)})
            for i, (_, steps) in enumerate(convs):
                think, answer, tool = steps[turn]
                history = think + marker + answer if style == "keep" else answer
                prompts[i] = prompts[i] + history + tool
    finally:
        engine.shutdown()
    return {"policy": policy, "style": style, "seconds": time.perf_counter() - t0, "turns": per_turn,
            "prefilled_total": sum(t["prefilled"] for t in per_turn),
            "hit_ratio_after_first": (sum(t["cached_tokens"] for t in per_turn[1:]) /
                                      max(1, sum(t["prompt_tokens"] for t in per_turn[1:]))),
            "kv_at_end_total": sum(t["reply_kv_at_end"] for t in per_turn),
            "kv_peak_total": sum(t["reply_kv_peak"] for t in per_turn)}


def main() -> None:
    from support.engines import use_cpu_sglang

    ap = argparse.ArgumentParser()
    ap.add_argument("--conversations", type=int, default=3)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--system", type=int, default=64)
    ap.add_argument("--think", type=int, default=160)
    ap.add_argument("--answer", type=int, default=96)
    ap.add_argument("--tool", type=int, default=30)
    ap.add_argument("--window", type=int, default=64)
    ap.add_argument("--buffer", type=int, default=16)
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    use_cpu_sglang()
    from kara_sglang.demo_model import build_tiny_model

    model = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
    rows = []
    for style in ("keep", "drop"):
        for policy in POLICIES:
            row = run(policy, style, args, model)
            row["settings"] = vars(args)
            rows.append(row)
            print(f"{style:4} {policy:15} prefilled {row['prefilled_total']:6} hit ratio (turns 2+) "
                  f"{row['hit_ratio_after_first']:.3f}  reply KV at end {row['kv_at_end_total']:6} "
                  f"peak {row['kv_peak_total']:6}  "
                  f"{row['seconds']:.1f} s", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
