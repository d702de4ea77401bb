"""Issue 19's next-turn accuracy grid: follow_up.py's arms against vanilla and Kara servers.

    python benchmarks/reasoning/run_follow_up.py --model DIR --out DIR [--n 500] [--gpus 2]

One server per lane (run_grid.py's start-up: same flags, W = 512, U = 64), every server with
``--enable-streaming-session``; per lane and style, follow_up.py runs each of its arms as its own
process, all at once. Rows go to ``OUT/followup-<lane>-<style>-<arm>.json``, per-problem records
beside them, gzipped (``followup-records-*.jsonl.gz``) when the grid is done, to be committed
with the rows (docs/results/README.md). The model should be trained with
``train.py --follow-ups 0.5``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_grid import W, U, compress_records, serve_lanes, start_client, wait_clients  # noqa: E402

HERE = Path(__file__).resolve().parent


def plan(gpus: int) -> list:
    kara = ["--kv-policy", "kara", "--kara-window", str(W), "--kara-buffer", str(U)]
    lanes = [dict(name="vanilla", gpu=0, pool=2_000_000, args=[], arms=["history"]),
             dict(name="kara25", gpu=1, pool=1_000_000, args=kara + ["--kara-keep-ratio", "0.25"],
                  arms=["history", "continue"]),
             dict(name="kara50", gpu=1, pool=1_000_000, args=kara + ["--kara-keep-ratio", "0.5"],
                  arms=["history", "continue"])]
    for lane in lanes:
        lane["gpu"] %= gpus
        lane["args"] = lane["args"] + ["--enable-streaming-session"]
    return lanes


def run_lane(lane: dict, out: Path, styles: list, n: int, concurrency: int, max_new_tokens: int, model: str) -> None:
    url = f"http://127.0.0.1:{lane['port']}"
    jobs = []
    for style in styles:
        for arm in lane["arms"]:
            tag = f"{lane['name']}-{style}-{arm}"
            cmd = [sys.executable, str(HERE / "follow_up.py"), "--url", url, "--model", model, "--arm", arm,
                   "--style", style, "--n", str(n), "--concurrency", str(concurrency), "--label", lane["name"],
                   "--max-new-tokens", str(max_new_tokens), "--out", str(out / f"followup-{tag}.json"),
                   "--records", str(out / f"followup-records-{tag}.jsonl")]
            jobs.append(start_client(cmd, out, tag))
    wait_clients(jobs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=64, help="conversations at once, per arm")
    ap.add_argument("--styles", default="verbose,dense")
    ap.add_argument("--attention-backend", default="triton")
    ap.add_argument("--max-new-tokens", type=int, default=16384)
    ap.add_argument("--cpu-smoke", action="store_true", help="SGLang's CPU path: checks the plumbing only")
    a = ap.parse_args()

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    lanes = plan(a.gpus)
    for lane in lanes:  # a row per open session and per running turn (see follow_up.py)
        arms = len(lane["arms"]) * len(a.styles.split(","))
        lane["max_running_requests"] = max(256, 2 * a.concurrency * arms)
    (out / "followup-plan.json").write_text(json.dumps({"lanes": lanes, "n": a.n, "W": W, "U": U,
                                                        "sglang_version": importlib.metadata.version("sglang"),
                                                        "max_new_tokens": a.max_new_tokens}, indent=1))
    serve_lanes(a.model, lanes, out, a.attention_backend, a.cpu_smoke,
                lambda lane: run_lane(lane, out, a.styles.split(","), a.n, a.concurrency, a.max_new_tokens, a.model))
    compress_records(out, "followup-records-*.jsonl")
    print(f"[{time.strftime('%T')}] follow-up grid done", flush=True)


if __name__ == "__main__":
    main()
