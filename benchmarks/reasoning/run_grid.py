"""Accuracy vs KV retention on the ledger task, through real SGLang servers (issue 16's grid).

    python benchmarks/reasoning/run_grid.py --model DIR --out DIR [--n 500] [--gpus 2]

Writes the held-out problems (seeds from train.EVAL_SEED0, never trained on) as JSONL, starts
one SGLang server per *lane* (a server configuration: policy, W, U), spread over the GPUs and
side by side on each (a 135M model leaves an H200 mostly idle), and runs the project's
accuracy command (``python -m kara_sglang.accuracy``) against each lane for its settings, one
style after the other. Greedy decoding; every server tracks block coverage
(``KARA_TRACK_KEPT`` = the Kara window). Baselines run at budgets chosen so that their mean
decode KV over the reference traces equals Kara 25%'s (W = 512, U = 64), simulated with the
policies' own code (:func:`matched_budget`); the measured KV of every row is reported beside it.

Each (lane, style, setting) runs as its own accuracy process, all at once; its row goes to
``OUT/rows-<lane>-<style>-<k>.json`` (with the server's SGLang version and Kara settings) and
its per-problem records (reply text, finish reason, extracted answer, KV counts) to
``OUT/records-...jsonl``, gzipped to ``records-...jsonl.gz`` when the grid is done: commit
them with the rows (docs/results/README.md), so first_error.py and the block-coverage column
can be derived again from the repository. ``plan.json`` records every lane's launch flags and
the installed SGLang release; ``report.py`` turns it all into the results file.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import shutil
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ledger  # noqa: E402
from train import EVAL_SEED0  # noqa: E402

W, U = 512, 64
EXTRACT = r"regex:Answer:\s*(\d\d)"
NOTRACE_LANE = "kara-w512-u64"  # the lane whose server also runs the no-trace rows (opted out)


def write_data(out: Path, tokenizer, n: int, first: int = 0) -> Dict[str, dict]:
    """JSONL per style (and a no-trace variant), plus reference completion lengths: held-out
    problems ``first`` to ``first + n - 1`` (records index them from 0)."""
    info = {}
    for style in ledger.STYLES:
        probs = [ledger.make_problem(style, EVAL_SEED0 + first + i) for i in range(n)]
        lengths = [len(tokenizer(p.completion).input_ids) + 1 for p in probs]  # + EOS
        with open(out / f"data-{style}.jsonl", "w") as f:
            for i, p in enumerate(probs):
                f.write(json.dumps({"id": f"{style}-{i}", "question": p.prompt, "answer": p.answer}) + "\n")
        # The answer straight after the prompt, no reasoning: what the prompt alone gives.
        with open(out / f"notrace-{style}.jsonl", "w") as f:
            for i, p in enumerate(probs):
                f.write(json.dumps({"id": f"{style}-{i}", "question": p.prompt + ledger.THINK_END + "\nAnswer:",
                                    "answer": p.answer}) + "\n")
        info[style] = {"lengths": lengths, "max_new_tokens": max(lengths) + 256}
    return info


def mean_decode_kv(config, lengths: List[int]) -> float:
    """Mean decode KV tokens held per output token, averaged over requests, by the policy's own
    schedule (the adapter's countdown: plan after ``steps_until_due`` decode steps)."""
    from kara_sglang import WindowState, make_policy

    policy, total = make_policy(config), 0.0
    for n in lengths:
        state, t, held = WindowState(prompt_len=0), 0, 0
        while t < n:
            step = min(policy.steps_until_due(state), n - t)
            held += step * state.decode_kv + step * (step + 1) // 2
            state.on_decode(step)
            t += step
            task = policy.plan(state)
            if task is not None:
                state.apply(task, policy.tail_consumed(task))
        total += held / n
    return total / len(lengths)


def matched_budget(policy: str, target: float, lengths: List[int]) -> int:
    """Smallest decode-cache budget whose mean decode KV reaches ``target`` (bisection)."""
    from kara_sglang import KaraConfig

    lo, hi = U + 1, max(lengths)
    while lo < hi:
        mid = (lo + hi) // 2
        if mean_decode_kv(KaraConfig(policy=policy, window=W, buffer=U, budget=mid), lengths) < target:
            lo = mid + 1
        else:
            hi = mid
    return lo


def lanes(info: Dict[str, dict], gpus: int) -> List[dict]:
    """Server configurations, their GPU, and per style the accuracy command's settings."""
    from kara_sglang import KaraConfig

    budgets = {}
    for style, d in info.items():
        target = mean_decode_kv(KaraConfig(window=W, buffer=U, keep_ratio=0.25), d["lengths"])
        budgets[style] = {p: matched_budget(p, target, d["lengths"]) for p in ("threshold", "streaming", "longflow")}
        budgets[style]["kara25_mean_decode_kv"] = round(target, 1)
    same = lambda s: {st: s for st in info}  # noqa: E731
    out = [
        dict(name="kara-w512-u64", gpu=0, pool=2_000_000, args=["--kv-policy", "kara"],
             settings=same("vanilla;kara:keep=0.25;kara:keep=0.125")),
        dict(name="kara-w256-u64", gpu=0, pool=900_000, args=["--kv-policy", "kara", "--kara-window", "256"],
             settings=same("kara:keep=0.25")),
        dict(name="kara-w512-u32", gpu=0, pool=900_000, args=["--kv-policy", "kara", "--kara-buffer", "32"],
             settings=same("kara:keep=0.25")),
        dict(name="kara-w512-u64-b", gpu=1, pool=1_200_000, args=["--kv-policy", "kara"],
             settings=same("kara:keep=0.5;kara:keep=0.25,chunk=1")),
        dict(name="cask", gpu=0, pool=900_000, args=["--kv-policy", "cask"], settings=same("cask:keep=0.25")),
    ]
    # Recall (kara_sglang/recall.py, an emulation: evicted KV stays allocated, attention by its
    # own kernels outside CUDA graphs): what each decode step's own query brings back, per layer
    # and KV head. Not in the default grid (--lanes names them): every request holds its full
    # KV. 512 rows: all four settings' requests run at once (no graphs to size).
    recall = ["--kv-policy", "kara", "--kara-recall-tokens", "256", "--disable-cuda-graph"]
    both = same("kara:keep=0.25;kara:keep=0.125")
    out += [
        dict(name="recall-exact-lag0", gpu=0, pool=1_200_000, args=recall, settings=both),
        dict(name="recall-bits2-lag0", gpu=1, pool=1_200_000, args=recall + ["--kara-recall-digest", "bits2"],
             settings=both),
        # A low-precision GPU tier: 2-bit keys rank, the recalled K and V are attended at 4 / 2 bits.
        dict(name="recall-bits2-kv4", gpu=0, pool=1_200_000,
             args=recall + ["--kara-recall-digest", "bits2", "--kara-recall-kv", "bits4"], settings=both),
        dict(name="recall-bits2-kv2", gpu=1, pool=1_200_000,
             args=recall + ["--kara-recall-digest", "bits2", "--kara-recall-kv", "bits2"], settings=both),
        dict(name="recall-exact-lag1", gpu=1, pool=1_200_000, args=recall + ["--kara-recall-lag", "1"],
             settings=same("kara:keep=0.25")),
    ]
    for lane in out[-5:]:
        lane.update(optional=True, max_running_requests=512)
    # The GPU tier (kara_sglang/recall_tier.py): evicted K and V at 4 bits on the GPU, their pool
    # slots freed, CUDA graphs on; the setting of the throughput waves (two stages: 64 pages of
    # 16 tokens by their key bounds, then 4-bit keys; each request's last 4,096 evicted tokens).
    # Its tier holds every running request's horizon at once, so no window falls back.
    # 16 pages of 16 tokens = R: the kept pages' tokens are the selection (Quest's own, no second
    # ranking; the faster setting in the throughput waves, whose answers the probe doubted).
    rows, horizon = 256, 4096
    for pages in (64, 16):
        tier = ["--kv-policy", "kara", "--kara-recall-tokens", "256", "--kara-recall-kv", "bits4",
                "--kara-recall-tier-tokens", str(rows * horizon), "--kara-recall-pages", str(pages),
                "--kara-recall-horizon", str(horizon)]
        out.append(dict(name=f"tier-p{pages}-h{horizon}", gpu=1, pool=1_200_000, args=tier, settings=both,
                        optional=True, max_running_requests=rows))
    for policy in ("threshold", "streaming", "longflow"):
        out.append(dict(name=policy, gpu=1, pool=900_000,
                        args=["--kv-policy", policy, "--kara-budget", str(budgets[next(iter(info))][policy])],
                        settings={st: f"{policy}:budget={budgets[st][policy]}" for st in info}))
    for lane in out:
        lane["gpu"] %= gpus
        lane["args"] = lane["args"] + (["--kara-window", str(W)] if "--kara-window" not in lane["args"] else []) \
            + (["--kara-buffer", str(U)] if "--kara-buffer" not in lane["args"] else [])
    return out, budgets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# CPU plumbing check (no GPU): SGLang's CPU path, as the project's tests run it.
CPU_SMOKE_ARGS = ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
                  "--disable-overlap-schedule", "--skip-server-warmup", "--max-total-tokens", "60000"]


def start_server(model: str, lane: dict, out: Path, backend: str, cpu_smoke: bool) -> subprocess.Popen:
    lane["port"] = free_port()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(lane["gpu"]), KARA_TRACK_KEPT=str(W))
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--host", "127.0.0.1",
           "--port", str(lane["port"]), "--random-seed", "0", "--log-level", "warning"] + lane["args"]
    rows = str(lane.get("max_running_requests", 256))
    if cpu_smoke:
        cmd += CPU_SMOKE_ARGS + ["--max-running-requests", rows]
    else:
        cmd += ["--attention-backend", backend, "--max-total-tokens", str(lane["pool"]),
                "--mem-fraction-static", "0.9", "--max-running-requests", rows, "--cuda-graph-max-bs", "256",
                "--disable-prefill-cuda-graph"]
    log = open(out / f"server-{lane['name']}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_healthy(lane: dict, proc: subprocess.Popen, seconds: float) -> bool:
    end = time.time() + seconds
    while time.time() < end:
        if proc.poll() is not None:
            return False
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{lane['port']}/health", timeout=5)
            return True
        except OSError:
            time.sleep(2)
    return False


def accuracy_command(url: str, data: Path, setting: str, max_new_tokens: int, concurrency: int,
                     out: Path, tag: str, extract: str = EXTRACT) -> List[str]:
    return [sys.executable, "-m", "kara_sglang.accuracy", "--url", url, "--data", str(data), "--extract", extract,
            "--settings", setting, "--max-new-tokens", str(max_new_tokens), "--concurrency", str(concurrency),
            "--no-progress", "--out", str(out / f"rows-{tag}.json"), "--records", str(out / f"records-{tag}.jsonl")]


def run_lane(lane: dict, info: Dict[str, dict], out: Path, concurrency: int, styles: List[str]) -> None:
    """Every (style, setting) of the lane at once, one accuracy process each: a setting's wall
    time is bounded by its longest trace, so running them one after another would add those up."""
    url = f"http://127.0.0.1:{lane['port']}"
    jobs = []
    for style in styles:
        for k, setting in enumerate(lane["settings"][style].split(";")):
            tag = f"{lane['name']}-{style}-{k}"
            cmd = accuracy_command(url, out / f"data-{style}.jsonl", setting, info[style]["max_new_tokens"],
                                   concurrency, out, tag)
            jobs.append(start_client(cmd, out, tag))
        if lane["name"] == NOTRACE_LANE:  # the prompt alone (no reasoning), vanilla
            tag = f"notrace-{style}"
            cmd = accuracy_command(url, out / f"notrace-{style}.jsonl", "vanilla", 4, concurrency, out, tag,
                                   extract=r"regex:(\d\d)")
            jobs.append(start_client(cmd, out, tag))
    wait_clients(jobs)


def start_client(cmd: List[str], out: Path, tag: str):
    """A client process logging to ``OUT/client-<tag>.log``: (tag, start time, process)."""
    return tag, time.time(), subprocess.Popen(cmd, stdout=open(out / f"client-{tag}.log", "w"), stderr=subprocess.STDOUT)


def wait_clients(jobs) -> None:
    for tag, t0, proc in jobs:
        rc = proc.wait()
        print(f"[{time.strftime('%T')}] {tag}: rc={rc} after {time.time() - t0:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=500, help="held-out problems per style")
    ap.add_argument("--first", type=int, default=0, help="the first held-out problem (a grid split in "
                    "parts: --first 250 --n 250 is the second half of 500; plan.json records it)")
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=128, help="per accuracy process (one per setting)")
    ap.add_argument("--attention-backend", default="triton")
    ap.add_argument("--styles", default="verbose,dense")
    ap.add_argument("--lanes", default="", help="comma-separated lane names to run (default all)")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="override (default: longest reference + 256)")
    ap.add_argument("--waves", type=int, default=0, help="at most this many lanes' servers at once, the "
                    "next wave starting when one ends (default 0: all lanes at once); lanes without CUDA "
                    "graphs (recall) run far faster alone than sharing a GPU")
    ap.add_argument("--pools", default="", help="NAME=TOKENS,... a lane's KV pool, overriding its default "
                    "(lanes sharing one GPU must fit in it together)")
    ap.add_argument("--cpu-smoke", action="store_true", help="SGLang's CPU path: checks the plumbing only")
    a = ap.parse_args()
    from transformers import AutoTokenizer

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    info = write_data(out, AutoTokenizer.from_pretrained(a.model), a.n, a.first)
    if a.max_new_tokens:
        for d in info.values():
            d["max_new_tokens"] = a.max_new_tokens
    plan, budgets = lanes(info, a.gpus)
    if a.lanes:
        plan = [lane for lane in plan if lane["name"] in a.lanes.split(",")]
    else:
        plan = [lane for lane in plan if not lane.get("optional")]
    for item in filter(None, a.pools.split(",")):
        name, tokens = item.split("=")
        [lane.update(pool=int(tokens)) for lane in plan if lane["name"] == name]
    (out / "plan.json").write_text(json.dumps({
        "lanes": plan, "budgets": budgets, "n": a.n, "first": a.first, "notrace_lane": NOTRACE_LANE,
        "sglang_version": importlib.metadata.version("sglang"), "attention_backend": a.attention_backend,
        "max_new_tokens": {s: d["max_new_tokens"] for s, d in info.items()}}, indent=1))
    print(f"budgets matched to Kara 25%: {json.dumps(budgets)}", flush=True)
    size = a.waves or len(plan)
    for start in range(0, len(plan), size):
        serve_lanes(a.model, plan[start:start + size], out, a.attention_backend, a.cpu_smoke,
                    lambda lane: run_lane(lane, info, out, a.concurrency, a.styles.split(",")))
    compress_records(out)
    print(f"[{time.strftime('%T')}] grid done", flush=True)


def compress_records(out: Path, pattern: str = "records-*.jsonl") -> None:
    """``records-*.jsonl`` -> ``records-*.jsonl.gz`` (the raw records are committed compressed)."""
    for path in sorted(out.glob(pattern)):
        with open(path, "rb") as src, gzip.open(f"{path}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        path.unlink()


def serve_lanes(model: str, plan: List[dict], out: Path, backend: str, cpu_smoke: bool, run) -> None:
    """Start every lane's server, run ``run(lane)`` for each healthy one in its own thread, stop them."""
    procs = [start_server(model, lane, out, backend, cpu_smoke) for lane in plan]
    try:
        ready = [wait_healthy(lane, p, 600) for lane, p in zip(plan, procs)]
        print(f"[{time.strftime('%T')}] servers up: {[l['name'] for l, r in zip(plan, ready) if r]}; "
              f"failed: {[l['name'] for l, r in zip(plan, ready) if not r]}", flush=True)
        threads = [threading.Thread(target=run, args=(lane,)) for lane, r in zip(plan, ready) if r]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    main()
