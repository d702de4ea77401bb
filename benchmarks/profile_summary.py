"""Where a decode step's time goes, from a trace SGLang's profiler wrote (bench_serving.py
--profile-at): GPU kernel time per step by kind (attention, GEMM, Kara's kernels, ...), the GPU's
idle share of the profiled span (host work the GPU waited for), per trace.

    python benchmarks/profile_summary.py DIR [DIR ...] [--json OUT]

Steps are counted as CUDA-graph launches (decode runs as one graph a step); a trace without
graph launches (eager mode, prefill) is divided by its forward passes as SGLang's profiler
counts them (`--steps`).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re

# First match wins; names are kernel symbols as CUPTI reports them (lower-cased).
KINDS = [
    ("kara", r"_window_score_kernel|_compact_kernel|_merge_kernel|_longflow|_evict_lowest"),
    # recall (kernels/recall*.py, select_top.py): before attention, whose pattern "decode_kernel" would match
    ("kara_recall", r"_rank_kernel|_rank_pages|_rank_tier|_page_bounds|_recall_decode|_plan_refresh"
                    r"|_write_planned|_fill_buffer|_quantize_kernel|_select_top"),
    # before attention: FlashInfer's norm and RoPE kernels carry "flashinfer" in their names
    ("norm_rope_act", r"rmsnorm|layernorm|rotary|rope|silu|act_and_mul|gelu"),
    ("attention", r"flash|fmha|attn|attention|batchdecode|batchprefill|decode_kernel|_fwd_kernel"),
    ("gemm", r"gemm|cutlass|xmma|nvjet|cublas|splitkreduce|matmul"),
    ("kv_write", r"store_kv|set_kv|kv_buffer|copy_kv|scatter"),
    ("sampling", r"argmax|topk|top_k|sort|softmax|sampl"),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, low):
            return kind
    return "other"


def union_us(intervals) -> float:
    """Time covered by at least one kernel (streams overlap)."""
    total, end = 0.0, None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def summarize(path: str, steps_hint: int | None = None) -> dict:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") == "kernel" and e.get("ph") == "X"]
    if not kernels:
        raise SystemExit(f"{path}: no GPU kernels in the trace")
    launches = sum(1 for e in events if e.get("cat") == "cuda_runtime" and e.get("name") == "cudaGraphLaunch")
    steps = launches or steps_hint or 1
    by_kind, top = {}, {}
    for e in kernels:
        k = kind_of(e["name"])
        by_kind[k] = by_kind.get(k, 0.0) + e["dur"]
        top[e["name"]] = top.get(e["name"], 0.0) + e["dur"]
    span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    busy = union_us((e["ts"], e["ts"] + e["dur"]) for e in kernels)
    kernel_sum = sum(by_kind.values())
    return {
        "trace": os.path.basename(path), "steps": steps, "graph_launches": launches,
        "span_ms_per_step": span / steps / 1e3, "gpu_busy_ms_per_step": busy / steps / 1e3,
        "gpu_idle_share": 1 - busy / span,
        "kernel_ms_per_step": {k: v / steps / 1e3 for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "kernel_share": {k: v / kernel_sum for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_kernels_ms_per_step": {n[:120]: v / steps / 1e3
                                    for n, v in sorted(top.items(), key=lambda kv: -kv[1])[:12]},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+", help="folders (or files) holding *.trace.json.gz")
    ap.add_argument("--steps", type=int, default=None, help="steps, where the trace has no graph launches")
    ap.add_argument("--json", default=None, help="write the summaries here")
    args = ap.parse_args()
    out = []
    for d in args.dirs:
        paths = [d] if os.path.isfile(d) else sorted(glob.glob(os.path.join(d, "**", "*.trace.json*"), recursive=True))
        if not paths:
            raise SystemExit(f"{d}: no *.trace.json(.gz) here")
        for p in paths:
            s = summarize(p, args.steps)
            s["dir"] = d
            out.append(s)
            kinds = "  ".join(f"{k} {v:.2f}" for k, v in s["kernel_ms_per_step"].items())
            print(f"{d}: {s['steps']} steps, {s['span_ms_per_step']:.2f} ms/step, GPU busy "
                  f"{s['gpu_busy_ms_per_step']:.2f} ms (idle {100 * s['gpu_idle_share']:.1f}%); ms/step: {kinds}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
