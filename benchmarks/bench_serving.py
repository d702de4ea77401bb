"""Serving throughput of real SGLang with and without a KV policy (one configuration per run).

    python benchmarks/bench_serving.py --policy kara --keep-ratio 0.25 --out row.json \\
        --workload 256x1024+2048 --workload 64x1024+256

Model: SGLang's ``--load-format dummy`` with Llama-3.1-8B's published shape (random weights,
real shapes and speed), ``--skip-tokenizer-init`` with token ids. Each workload offers all its
requests at once (``ignore_eos``) and records output tokens/s, peak running requests, peak
KV tokens in use (from SGLang's decode log lines) and retractions. Every configuration runs in
its own process because SGLang's ``Engine.shutdown()`` ends all schedulers of a process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}


def parse_workload(text: str):
    count, rest = text.split("x")
    prompt, output = rest.split("+")
    return int(count), int(prompt), int(output)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default="none")
    ap.add_argument("--keep-ratio", type=float, default=None)
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--buffer", type=int, default=64)
    ap.add_argument("--workload", action="append", required=True, help="NxPROMPT+OUTPUT")
    ap.add_argument("--warmup", default="16x256+64", help="run first, not recorded (JIT, caches)")
    ap.add_argument("--attention-backend", default="triton")
    ap.add_argument("--mem-fraction-static", type=float, default=0.85)
    ap.add_argument("--max-running-requests", type=int, default=256)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import sglang
    import torch

    model_dir = tempfile.mkdtemp()
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(LLAMA_31_8B, f)
    kara = {}
    if args.policy != "none":
        kara = dict(kv_policy=args.policy, kara_window=args.window, kara_buffer=args.buffer)
        if args.keep_ratio is not None:
            kara["kara_keep_ratio"] = args.keep_ratio
        if args.budget is not None:
            kara["kara_budget"] = args.budget
    t0 = time.time()
    engine = sglang.Engine(
        model_path=model_dir, load_format="dummy", skip_tokenizer_init=True,
        attention_backend=args.attention_backend, sampling_backend="pytorch", grammar_backend="none",
        mem_fraction_static=args.mem_fraction_static, max_running_requests=args.max_running_requests,
        disable_overlap_schedule=True, decode_log_interval=10, log_level="info", random_seed=0, **kara)
    startup = time.time() - t0
    rows = []
    rng = random.Random(0)
    for spec in [args.warmup] + args.workload:
        n, prompt_len, output_len = parse_workload(spec)
        prompts = [[rng.randrange(1000, 120000) for _ in range(prompt_len)] for _ in range(n)]
        sampling = {"temperature": 0, "max_new_tokens": output_len, "ignore_eos": True}
        print(f"BENCH-START {spec}", file=sys.stderr, flush=True)
        t0 = time.time()
        outs = engine.generate(input_ids=prompts, sampling_params=sampling)
        wall = time.time() - t0
        print(f"BENCH-END {spec}", file=sys.stderr, flush=True)
        produced = sum(o["meta_info"]["completion_tokens"] for o in outs)
        if spec == args.warmup:
            continue
        rows.append({
            "policy": args.policy if args.policy != "none" else "vanilla",
            "keep_ratio": args.keep_ratio if args.policy == "kara" else None,
            "budget": args.budget, "window": args.window if kara else None,
            "buffer": args.buffer if kara else None,
            "prompt_len": prompt_len, "output_len": output_len, "num_requests": n,
            "wall_s": wall, "output_tok_per_s": produced / wall,
            "retractions": sum(o["meta_info"].get("num_retractions", 0) for o in outs),
            "kv_tokens_evicted": sum(o["meta_info"]["kv_tokens_evicted"][-1]
                                     for o in outs if "kv_tokens_evicted" in o["meta_info"]),
            "attention_backend": args.attention_backend, "startup_s": startup,
            "mem_fraction_static": args.mem_fraction_static,
            "max_running_requests": args.max_running_requests,
            "device": torch.cuda.get_device_name(0), "sglang_version": sglang.__version__,
        })
        print(json.dumps(rows[-1]), flush=True)
    engine.shutdown()
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


def peaks_from_log(log_text: str) -> dict:
    """Peak running requests and KV tokens per workload, from SGLang's decode log lines."""
    peaks, current = {}, None
    for line in log_text.splitlines():
        if "BENCH-START" in line:
            current = line.split("BENCH-START", 1)[1].strip()
            peaks[current] = {"peak_running_requests": 0, "peak_kv_tokens": 0}
        elif "BENCH-END" in line:
            current = None
        elif current is not None:
            m = re.search(r"Decode batch.*#running-req: (\d+), #token: (\d+)", line)
            if m:
                p = peaks[current]
                p["peak_running_requests"] = max(p["peak_running_requests"], int(m.group(1)))
                p["peak_kv_tokens"] = max(p["peak_kv_tokens"], int(m.group(2)))
    return peaks


if __name__ == "__main__":
    main()
