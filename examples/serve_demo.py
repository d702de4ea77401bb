"""Start real SGLang with ``--kv-policy kara`` and show what a long generation keeps.

    python examples/serve_demo.py                       # CPU: builds a tiny local model
    python examples/serve_demo.py --model-path M        # GPU: any supported model

On a machine without a GPU it builds a tiny random-weight model under ``data/`` (no model
hub needed), runs SGLang's CPU engine with the torch_native attention backend, and puts the
test stand-in for the CUDA-only ``sgl_kernel`` package on ``PYTHONPATH`` (it fails loudly if
a kernel is ever called). It then sends one long request with Kara and the same request
opted out (``custom_params: {"kv_policy": "none"}``) and prints KV kept and evicted.

Time on a 2-core CPU: under a minute when the machine is otherwise idle (CI's clean run:
server up in 22 s, the requests 4.1 s + a few seconds); over two minutes when another process
holds the CPU (`time python examples/serve_demo.py`, two runs: 2 min 38 s and 2 min 24 s;
SGLang's start-up alone 58 s and 44 s). Most of it is SGLang's start-up, not this demo's sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, payload: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        return json.loads(resp.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", default=None, help="default: a tiny local model (CPU)")
    ap.add_argument("--max-new-tokens", type=int, default=1200)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--buffer", type=int, default=32)
    ap.add_argument("--keep-ratio", type=float, default=0.25)
    args = ap.parse_args()

    import torch

    env = os.environ.copy()
    server_args = []
    model = args.model_path
    if not torch.cuda.is_available():
        from kara_sglang.demo_model import build_tiny_model

        model = model or str(build_tiny_model(ROOT / "data" / "tiny_model"))
        standin = str(ROOT / "tests" / "support" / "sgl_kernel_standin")
        env.update(SGLANG_USE_CPU_ENGINE="1", TRITON_INTERPRET="1",
                   PYTHONPATH=os.pathsep.join(p for p in (standin, env.get("PYTHONPATH")) if p))
        server_args = ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
                       "--max-total-tokens", "20000", "--mem-fraction-static", "0.3", "--skip-server-warmup"]
    if model is None:
        raise SystemExit("--model-path is required on a GPU machine")

    port = free_port()
    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--port", str(port),
               "--host", "127.0.0.1", "--kv-policy", "kara", "--kara-window", str(args.window),
               "--kara-buffer", str(args.buffer), "--kara-keep-ratio", str(args.keep_ratio)] + server_args
    print("$ python", " ".join(command[1:]), flush=True)
    log_path = ROOT / "data" / "serve_demo.log"
    log_path.parent.mkdir(exist_ok=True)
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            if server.poll() is not None:
                raise SystemExit("server exited; see " + str(log_path) + "\n" + log_path.read_text()[-2000:])
            try:
                urllib.request.urlopen(base + "/health", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        print(f"server up in {time.time() - t0:.0f} s (log: {log_path})\n")
        sampling = {"temperature": 0, "max_new_tokens": args.max_new_tokens, "ignore_eos": True}
        print(f"{'request':<12}{'tokens out':>11}{'KV kept':>9}{'evicted':>9}{'KV / vanilla':>14}{'seconds':>9}")
        for name, custom in (("kara", None), ("opted out", {"kv_policy": "none"})):
            params = dict(sampling, **({"custom_params": custom} if custom else {}))
            t0 = time.time()
            out = post(base + "/generate", {"text": "Let us think step by step.", "sampling_params": params})
            meta = out["meta_info"]
            kept, evicted = meta["kv_tokens_kept"][-1], meta["kv_tokens_evicted"][-1]
            print(f"{name:<12}{meta['completion_tokens']:>11}{kept:>9}{evicted:>9}"
                  f"{kept / (kept + evicted):>13.0%}{time.time() - t0:>9.1f}")
        info = json.loads(urllib.request.urlopen(base + "/server_info").read())["internal_states"][0]["kara"]
        print(f"\nserver: {info['compression_events']} compressions, {info['tokens_evicted']} tokens evicted, "
              f"{info['available_tokens']} of {info['max_total_tokens']} KV slots free")
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


if __name__ == "__main__":
    main()
