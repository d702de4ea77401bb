"""Turn the GPU serving runs into docs/results/throughput.json, the bytes model and the plot.

    python benchmarks/report_throughput.py docs/results/raw-2026-11-25b

Reads each ``row-*.json`` written by ``bench_serving.py``, and for a configuration whose
process was killed by its time limit before the workload finished (its ``log-*.txt`` has a
BENCH-START without a BENCH-END) derives the throughput of the part that ran from SGLang's
decode log lines (running requests x 10 steps per line, over the lines' time span), flagged
``"complete": false`` with the fraction of the output tokens done. On complete runs that
log-derived number agrees with the client-measured one to 0.3% (printed when run), which is
what makes the partial rows usable; they are still not completion throughputs.

Bytes model: a decode step reads the weights and the KV of every running request, so
throughput(C) = C / ((weights + C x avg KV per request x bytes per token) / bandwidth), with
the average over a request's life from Kara's own window bookkeeping. Each row is compared
with vanilla on the same workload (same run when it has one): measured gain, the gain the model
predicts at the two measured peak concurrencies, and the share of it reached.

Server settings (issue 17): rows carry ``attention_backend``, ``kv_cache_dtype`` and ``overlap``
as the server resolved them, and ``device``; rows from before those fields were Triton, auto
(bf16) KV, overlap off, on the H100 (``with_defaults``). Rows are compared with vanilla of the
same backend, KV dtype and device, preferring vanilla with overlap on (SGLang's default), and
the bytes model counts 1 byte per KV element for FP8.

Model shapes: rows carry ``model`` (``bench_serving.py --model-shape``); rows from before that
field are all ``llama-3.1-8b``. Rows are compared with vanilla of the same model; rows of the
other shapes get the bytes model of ``arch_bytes_model.py`` (MLA and sliding-window KV, the
experts a step touches) at their measured peak concurrency.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import re
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from bench_serving import parse_workload  # noqa: E402  (the workload grammar, one definition)

WEIGHT_BYTES = 16.06e9  # Llama-3.1-8B, bf16
KV_BYTES_PER_TOKEN = 32 * 8 * 128 * 2 * 2  # layers x KV heads x head_dim x (K, V) x bf16
LLAMA = "llama-3.1-8b"  # the shape every row had before rows named theirs
OLD_ROW = {"attention_backend": "triton", "kv_cache_dtype": "auto", "overlap": False,
           "device": "NVIDIA H100 80GB HBM3", "model": LLAMA}  # what every row had before these fields


def with_defaults(row: dict) -> dict:
    for key, value in OLD_ROW.items():
        row.setdefault(key, value)
    return row


def kv_bytes_per_token(row: dict) -> int:
    return KV_BYTES_PER_TOKEN // 2 if str(row.get("kv_cache_dtype", "auto")).startswith("fp8") else KV_BYTES_PER_TOKEN
BANDWIDTH = 2.998e12  # measured device-to-device copy bandwidth of the H100 (bench_kernels.py)
# Measured copy bandwidth per device: the H200's is the device library's (KINDS.md, 4.3 TB/s).
BANDWIDTH_BY_DEVICE = {"NVIDIA H100 80GB HBM3": BANDWIDTH, "NVIDIA H200": 4.3e12}
DEFAULT_POOL_TOKENS = 423_494  # --mem-fraction-static 0.85 on the H100; rows carry their own
BATCH_LINE = re.compile(r"\[(\S+ \S+)\] (Prefill|Decode) batch.*?#running-req: (\d+)")


def kv_profile(policy: str, prompt: int, output: int, keep=None, budget=None, window=512, buffer=64):
    """(average, peak) KV tokens a request holds over its life under ``policy``."""
    if policy == "vanilla":
        return prompt + output / 2, prompt + output
    from kara_sglang import KaraConfig, WindowState, make_policy

    cfg = dict(policy=policy, window=window, buffer=buffer)
    cfg.update({"keep_ratio": keep} if keep is not None else {})
    cfg.update({"budget": budget} if budget is not None else {})
    pol = make_policy(KaraConfig(**cfg))
    state, total, peak = WindowState(prompt_len=prompt), 0, 0
    for _ in range(output):
        state.on_decode()
        total, peak = total + state.kv_len, max(peak, state.kv_len)
        task = pol.plan(state)
        if task is not None:
            state.apply(task, pol.tail_consumed(task))
    return total / output, peak


def model_tok_per_s(concurrency: float, avg_kv: float, kv_bytes: int = KV_BYTES_PER_TOKEN,
                    bandwidth: float = BANDWIDTH) -> float:
    return concurrency * bandwidth / (WEIGHT_BYTES + concurrency * avg_kv * kv_bytes)


def partial_from_log(path: str, spec: str, num_requests: int, output_len: int, upto: float = 1.0):
    """Output tok/s of ``spec`` from the decode log lines, over its first ``upto`` share of
    the output tokens (like-for-like between waves cut at different points)."""
    lines = open(path, errors="replace").read().splitlines()
    try:
        start = lines.index(next(l for l in lines if l.endswith(f"BENCH-START {spec}")))
    except StopIteration:
        return None
    tokens, first, last, peak = 0, None, None, 0
    for line in lines[start:]:
        if "BENCH-END" in line or tokens >= upto * num_requests * output_len:
            break
        m = BATCH_LINE.match(line)
        if m:  # the time span starts at the first prefill, as the client's clock does
            t = datetime.datetime.fromisoformat(m.group(1))
            first, last = first or t, t
            if m.group(2) == "Decode":
                tokens += 10 * int(m.group(3))  # decode_log_interval = 10 steps per line
                peak = max(peak, int(m.group(3)))
    if first is None or last == first:
        return None
    return {"output_tok_per_s": tokens / (last - first).total_seconds(), "peak_running_requests": peak,
            "fraction_done": tokens / (num_requests * output_len)}


def server_config(log: str, text: str):
    """The bench's arguments: its BENCH-CONFIG line, or (older logs) the file name."""
    m = re.search(r"^BENCH-CONFIG (.*)$", text, re.M)
    if m:
        config = json.loads(m.group(1))
        config["warmup"] = config["warmup"].split("#")[0]
        return config
    m = re.match(r"(none|kara|threshold|streaming)-([0-9.]*|-)-([0-9]*)(?:\.|$)", os.path.basename(log)[4:-4])
    if not m:
        return None
    policy, ratio, budget = m.groups()
    return {"policy": policy, "keep_ratio": float(ratio) if ratio not in ("", "-") else None,
            "budget": int(budget) if budget else None, "window": 512, "buffer": 64, "warmup": "16x256+64",
            "attention_backend": "triton", "mem_fraction_static": 0.85, "max_running_requests": 256}


def run_env(text: str) -> dict:
    """Device, SGLang version and pool of a run, from its log's BENCH-ENV line. Logs written
    before that line existed (2026-11-25) are all from the same H100 image with SGLang 0.5.17."""
    m = re.search(r"^BENCH-ENV (.*)$", text, re.M)
    if m:
        return json.loads(m.group(1))
    return {"device": "NVIDIA H100 80GB HBM3", "sglang_version": "0.5.17"}


def add_gains(rows) -> None:
    """Gain over vanilla on the same workload (same run if it has one) vs the bytes model's;
    the share is measured gain / model gain (the target: >= 0.9). Where the run offered each
    policy its own request count (one wave at that policy's pool limit, the 1k + 16k rows), the
    vanilla row of the same prompt/output/rate/TP size in that run is the baseline, named in
    ``vanilla_workload``. A run without its own vanilla row uses another run's (same device
    kind and settings); rows are only compared within one attention backend."""
    def shape(r):
        return (r["prompt_len"], r["output_len"], r.get("request_rate"), r.get("tp_size") or 1,
                r["attention_backend"], r["kv_cache_dtype"], r["device"], r["model"])

    vanilla = [r for r in rows if r["policy"] == "vanilla" and r.get("model_tok_per_s")]
    for row in rows:
        base = [v for v in vanilla if shape(v) == shape(row)]
        base = [v for v in base if v["num_requests"] == row["num_requests"]] or base
        base = [v for v in base if v.get("run") == row.get("run")] or base
        base = [v for v in base if v["overlap"]] or base  # SGLang's default vanilla, where measured
        if row["policy"] == "vanilla" or not base or not row.get("model_tok_per_s"):
            continue
        v = base[0]
        row["vanilla_workload"], row["vanilla_overlap"] = v["workload"], v["overlap"]
        row["gain_vs_vanilla"] = row["output_tok_per_s"] / v["output_tok_per_s"]
        if row.get("request_rate"):
            continue  # Poisson arrivals: concurrency varies, the model's constant peak does not hold
        row["model_gain"] = row["model_tok_per_s"] / v["model_tok_per_s"]
        row["share_of_model_gain"] = row["gain_vs_vanilla"] / row["model_gain"]


def log_waves(raw_dir: str):
    """(log, its text, server config, workload spec, parsed workload) of every measured wave
    each bench log started (the warm-up left out)."""
    for log in sorted(glob.glob(os.path.join(raw_dir, "log-*.txt"))):
        text = open(log, errors="replace").read()
        server = server_config(log, text)
        if server is None:
            continue
        for spec in re.findall(r"BENCH-START (\S+#\d+)", text):
            if not spec.startswith(server["warmup"]):
                yield log, text, server, spec, parse_workload(spec.split("#")[0])


def collect(raw_dir: str):
    rows = []
    for path in sorted(glob.glob(os.path.join(raw_dir, "row-*.json"))):
        for row in json.load(open(path)):
            row["complete"] = True
            log = path.replace("row-", "log-").replace(".json", ".txt")
            check = partial_from_log(log, row["workload"], row["num_requests"], row["output_len"])
            if check and row["output_len"] >= 1024:
                print(f"log-derived vs measured, {row['policy']} {row['keep_ratio']} {row['workload']}: "
                      f"{check['output_tok_per_s']:.0f} vs {row['output_tok_per_s']:.0f} tok/s")
            rows.append(with_defaults(row))
    for log, text, server, spec, w in log_waves(raw_dir):
        row_file = log.replace("log-", "row-").replace(".txt", ".json")
        done = {r["workload"] for r in json.load(open(row_file))} if os.path.exists(row_file) else set()
        if f"BENCH-END {spec}" in text or spec in done:
            continue
        part = partial_from_log(log, spec, w.num_requests, w.output_len)
        if part is None:
            continue
        policy = w.policy or server["policy"]
        rows.append({
            "policy": "vanilla" if policy == "none" else policy,
            "keep_ratio": (w.keep_ratio or server["keep_ratio"] or 0.25) if policy in ("kara", "cask") else None,
            "budget": w.budget if w.policy else server["budget"],
            "window": None if policy == "none" else server["window"],
            "buffer": None if policy == "none" else server["buffer"], "workload": spec,
            "prompt_len": w.prompt_len, "output_len": w.output_len, "num_requests": w.num_requests,
            "request_rate": w.request_rate, "complete": False, **part,
            "retractions": text.split(f"BENCH-START {spec}")[1].count("KV cache pool is full. Retract"),
            "attention_backend": server["attention_backend"],
            "mem_fraction_static": server["mem_fraction_static"],
            "max_running_requests": server["max_running_requests"],
            **run_env(text),
        })
        with_defaults(rows[-1])
    for row in rows:
        avg, peak = kv_profile(row["policy"], row["prompt_len"], row["output_len"], row.get("keep_ratio"),
                               row.get("budget"), row.get("window") or 512, row.get("buffer") or 64)
        row["model_avg_kv_tokens"], row["model_peak_kv_tokens"] = round(avg), peak
        if row.get("peak_running_requests") and row["model"] != LLAMA:
            model = arch_model_tok_per_s(row)
            if model is not None:
                row["model_tok_per_s"] = model
        elif row.get("peak_running_requests"):
            # Tensor parallel: each rank reads 1/tp of the weights and of every request's KV.
            row["model_tok_per_s"] = (row.get("tp_size") or 1) * model_tok_per_s(
                row["peak_running_requests"], avg, kv_bytes_per_token(row),
                BANDWIDTH_BY_DEVICE.get(row["device"], BANDWIDTH))
    return rows


def arch_model_tok_per_s(row: dict) -> Optional[float]:
    """A row of another model shape: arch_bytes_model.py's step (the row's GPU's bandwidth, the
    H200's for a GPU it has no numbers for) at the row's measured peak concurrency; None where
    that model has no such shape or policy."""
    import arch_bytes_model  # it imports this module: imported when needed

    device = arch_bytes_model.DEVICES.get(row.get("device"), arch_bytes_model.H200)
    arch = next((a for a in arch_bytes_model.architectures(device) if a.name == row["model"]), None)
    if arch is None or row["policy"] not in ("vanilla", "kara"):
        return None  # a --cpu-smoke shape, or a policy that model does not cover
    keep = row.get("keep_ratio") if row["policy"] == "kara" else None
    return arch_bytes_model.step(arch, row["prompt_len"], row["output_len"], keep,
                                 running=row["peak_running_requests"]).tok_per_s


def plot(rows, prompt: int, outputs, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = [("vanilla", None, None, "black"), ("threshold", None, 1024, "tab:orange"),
                ("kara", 0.5, None, "tab:green"), ("kara", 0.25, None, "tab:blue"),
                ("kara", 0.125, None, "tab:purple")]
    pool = next((r["max_total_tokens"] for r in rows if r.get("max_total_tokens")), DEFAULT_POOL_TOKENS)
    fig, axes = plt.subplots(1, len(outputs), figsize=(6 * len(outputs), 4.5))
    for ax, output in zip(axes, outputs):
        for policy, keep, budget, color in policies:
            avg, peak = kv_profile(policy, prompt, output, keep, budget)
            limit = int(pool / peak)  # every request at its peak KV at once still fits
            cs = list(range(1, 257))
            label = policy if policy == "vanilla" else (f"Kara {keep:.1%}" if keep else f"threshold {budget}")
            ax.plot(cs, [model_tok_per_s(c, avg) for c in cs], color=color, alpha=0.35)
            ax.plot(cs[:limit], [model_tok_per_s(c, avg) for c in cs[:limit]], color=color, label=label)
            for row in rows:
                if (row["policy"], row.get("keep_ratio"), row.get("budget"), row["prompt_len"],
                        row["output_len"]) == (policy, keep, budget, prompt, output) \
                        and row.get("peak_running_requests") \
                        and all(row.get(k, v) == v for k, v in OLD_ROW.items()) \
                        and (row.get("tp_size") or 1) == 1 and not row.get("request_rate"):
                    ax.scatter([row["peak_running_requests"]], [row["output_tok_per_s"]], color=color,
                               marker="o" if row["complete"] else "x", zorder=3)
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"{prompt} + {output} tokens", fontsize=10)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("Llama-3.1-8B shape on one H100, all requests at once: lines = bytes model (bold up to the "
                 "concurrency whose peak KV fits the pool), dots = measured, x = partial run", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_upto(raw: str, upto: float) -> None:
    """Each wave's log-derived tok/s over its first ``upto`` of the output tokens."""
    for log, _, _, spec, w in log_waves(raw):
        part = partial_from_log(log, spec, w.num_requests, w.output_len, upto)
        if part and part["fraction_done"] >= upto:
            print(f"{os.path.basename(log)[4:-4]:12} {spec:24} first {upto:.0%} of the tokens: "
                  f"{part['output_tok_per_s']:.0f} tok/s at {part['peak_running_requests']} requests")


def main() -> None:
    if "--upto" in sys.argv:  # report_throughput.py DIR --upto 0.8: print only, JSON untouched
        return print_upto(sys.argv[1], float(sys.argv[sys.argv.index("--upto") + 1]))
    raw = sys.argv[1] if len(sys.argv) > 1 else ""
    if not os.path.isdir(raw):  # e.g. --help: never rewrite the results file without a run to add
        sys.exit(f"usage: python benchmarks/report_throughput.py RAW_DIR [--upto FRACTION]; no directory {raw!r}")
    run = os.path.basename(raw.rstrip("/"))
    rows = collect(raw)
    for r in rows:
        r["run"] = run
    out = os.path.join(ROOT, "docs", "results", "throughput.json")
    old = [with_defaults(r) for r in json.load(open(out)) if r.get("run") != run] if os.path.exists(out) else []
    everything = old + rows
    add_gains(everything)
    json.dump(everything, open(out, "w"), indent=1)
    plot(everything, 1024, (4096, 8192, 16384), os.path.join(ROOT, "docs", "throughput_vs_concurrency.png"))
    print(f"{'run':16} {'shape':16} {'backend/kv/overlap':20} {'policy':9} {'keep':>5} {'budget':>6} {'workload':30} {'tok/s':>6} {'model':>6} "
          f"{'peak':>4} {'retr':>4} {'ITL':>6} {'done':>4} {'gain':>5} {'model':>5} {'share':>5}")
    for r in everything:
        if r["output_len"] < 1024:
            continue
        share = r.get("share_of_model_gain")
        config = f"{r['attention_backend']}/{r['kv_cache_dtype']}/{'on' if r['overlap'] else 'off'}"
        print(f"{r['run']:16} {r['model']:16} {config:20} {r['policy']:9} {str(r.get('keep_ratio')):>5} {str(r.get('budget')):>6} "
              f"{r['workload']:30} {r['output_tok_per_s']:6.0f} {r.get('model_tok_per_s', 0):6.0f} "
              f"{r.get('peak_running_requests', 0):4} {r.get('retractions', 0):4} "
              f"{r.get('itl_mean_ms') or 0:6.2f} {r.get('fraction_done', 1.0):4.2f} "
              f"{r.get('gain_vs_vanilla', 0):5.2f} {r.get('model_gain', 0):5.2f} "
              f"{share if share is None else round(share, 2)!s:>5}")


if __name__ == "__main__":
    main()
