"""A multi-turn agent workload through SGLang's own router, vanilla vs Kara: prefix-cache hits.

    python benchmarks/router/multi_turn_router.py --out docs/results/router.json          # CPU, tiny model
    python benchmarks/router/multi_turn_router.py --device cuda --model-path M ...              # GPU
    bash benchmarks/gpu/run_router.sh                                                         # on the lent H100

Starts ``--replicas`` SGLang HTTP servers (same flags, one policy) and ``sglang_router``
(``--policy cache_aware``) in front of them, then runs ``--conversations`` agent conversations
of ``--turns`` turns through the router: each turn sends the conversation so far (system prompt,
earlier turns' tool outputs and the model's own replies, as text) and appends the reply and a new
tool output for the next turn. All conversations of a turn run concurrently.

Per turn it records SGLang's ``cached_tokens`` (radix-tree hits on the worker the router chose)
over ``prompt_tokens``, and which worker served each conversation. Under Kara a compressed reply
never enters the radix tree (only exact tokens do), so the next turn can hit the earlier prompt
but not the reply; what matters here is that the router keeps each conversation on the worker
that holds its prefix, so the hits on the exact part survive replication.

The model is the tiny random one from ``kara_sglang.demo_model`` on the CPU (hit ratios do not
depend on the weights), or any ``--model-path`` on GPUs.

``--device cuda`` puts every replica on the first visible GPU, each with its own share of its
memory (``--mem-fraction-static``, KV pool pinned by ``--max-total-tokens``; pinned pools let the
replicas start together), Triton attention, decode CUDA graphs up to ``--cuda-graph-max-bs``,
and Kara's production defaults (W = 512, U = 64, chunks of 8). Rows are written after every turn
(a row cut short says ``"complete": false``), and SIGTERM stops the servers before exiting.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

POLICIES = {"vanilla": [], "kara": ["--kv-policy", "kara", "--kara-scope", "all"]}
# Settings left unset on the command line, per device: the CPU's are the committed CPU table's.
DEVICE_DEFAULTS = {
    "cpu": dict(window=64, buffer=16, chunk_size=2, max_total_tokens=20000, mem_fraction_static=0.3,
                parallel_start=False),
    "cuda": dict(window=512, buffer=64, chunk_size=8, max_total_tokens=120000, mem_fraction_static=0.3,
                 parallel_start=True),
}
LIVE: list = []  # every process started, for the SIGTERM handler


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, payload: dict, timeout: float = 600) -> dict:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_up(url: str, procs, log: Path, seconds: float = 600) -> None:
    end = time.time() + seconds
    while time.time() < end:
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"a process exited; see {log}")
        try:
            urllib.request.urlopen(url, timeout=5).read()
            return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{url} did not come up; see {log}")


def wait_routable(base: str, procs, log: Path, seconds: float = 180) -> None:
    """The router answers /health at once, before it has registered its workers (its workflow
    probes each one, gRPC first, then HTTP), so wait until a /generate through it succeeds."""
    end = time.time() + seconds
    while True:
        try:
            post(base + "/generate", {"text": "ready", "sampling_params": {"max_new_tokens": 1}}, timeout=60)
            return
        except (urllib.error.HTTPError, OSError) as err:  # 503/500 until a worker is active
            if any(p.poll() is not None for p in procs):
                raise RuntimeError(f"a process exited; see {log}") from err
            if time.time() > end:
                raise RuntimeError(f"router at {base} never routed a request ({err}); see {log}") from err
            time.sleep(2)


def start(cmd, log: Path, env=None) -> subprocess.Popen:
    sink = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env or os.environ.copy(),
                            start_new_session=True)
    LIVE.append(proc)
    return proc


def on_sigterm(signum, frame):
    """`timeout` sends SIGTERM: stop the servers (their own sessions would outlive us and hold the
    GPU; killing them also ends the HTTP calls the worker threads wait on), then exit."""
    for p in LIVE:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(128 + signum)


def stop(procs) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)


def server_cmd(args, port: int, policy: str) -> list:
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", args.model_path,
           "--host", "127.0.0.1", "--port", str(port), "--skip-server-warmup",
           "--max-total-tokens", str(args.max_total_tokens),
           # rids in the log say which worker served each request
           "--log-requests", "--log-requests-level", "0"] + POLICIES[policy]
    if policy != "vanilla":
        cmd += ["--kara-window", str(args.window), "--kara-buffer", str(args.buffer),
                "--kara-keep-ratio", str(args.keep), "--kara-chunk-size", str(args.chunk_size)]
    if args.device == "cpu":
        cmd += ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
                "--mem-fraction-static", str(args.mem_fraction_static)]
    else:  # every replica on the same (first visible) GPU, each with its own share of it
        cmd += ["--attention-backend", "triton", "--sampling-backend", "pytorch", "--grammar-backend", "none",
                "--mem-fraction-static", str(args.mem_fraction_static),
                "--cuda-graph-max-bs", str(args.cuda_graph_max_bs),
                "--max-running-requests", str(args.cuda_graph_max_bs),  # every decode batch in a graph
                # Kara turns overlap scheduling off; vanilla too, so both run the same scheduler.
                "--disable-overlap-schedule", "--disable-prefill-cuda-graph"]
    return cmd + args.server_arg


def device_name(device: str) -> str:
    if device == "cpu":
        return "cpu"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        return out or device
    except (OSError, subprocess.SubprocessError):
        return device


def kara_states(ports) -> list:
    states = []
    for port in ports:
        info = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=30).read())
        states.append(info["internal_states"][0].get("kara", {}))
    return states


def words(rng, n: int) -> str:
    from kara_sglang.demo_model import WORDS

    return " ".join(rng.choice(WORDS) for _ in range(n))


def run(policy: str, args, logs: Path, save=lambda row: None) -> dict:
    ports = [free_port() for _ in range(args.replicas)]
    procs = []
    t_start = time.perf_counter()
    try:
        # On a small CPU machine one at a time (concurrent start-ups time each other out); on a GPU
        # together (each pool pinned by --max-total-tokens, so neither sizes itself from the other).
        for i, port in enumerate(ports):
            procs.append(start(server_cmd(args, port, policy), logs / f"{policy}-server{i}.log"))
            if not args.parallel_start:
                wait_up(f"http://127.0.0.1:{port}/health", procs, logs / f"{policy}-server{i}.log")
        for i, port in enumerate(ports):
            wait_up(f"http://127.0.0.1:{port}/health", procs, logs / f"{policy}-server{i}.log")
        router_port = free_port()
        workers = [f"http://127.0.0.1:{p}" for p in ports]
        procs.append(start([sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
                            "--port", str(router_port), "--policy", "cache_aware", "--worker-urls", *workers,
                            # its metrics port is fixed (29000) otherwise: a second router on the machine panics
                            "--prometheus-port", str(free_port()), "--log-level", "warn"], logs / f"{policy}-router.log"))
        base = f"http://127.0.0.1:{router_port}"
        wait_up(base + "/health", procs, logs / f"{policy}-router.log")
        wait_routable(base, procs, logs / f"{policy}-router.log")
        startup = time.perf_counter() - t_start
        if args.warmup_tokens:  # JIT and CUDA caches (Kara's kernels too), outside the timed turns
            wrng = random.Random(args.seed + 1)
            texts = [words(wrng, args.system) for _ in ports]
            with ThreadPoolExecutor(len(ports)) as pool:  # straight to each server, not via the router
                list(pool.map(lambda w: post(f"http://127.0.0.1:{ports[w]}/generate", {
                    "text": texts[w], "rid": f"{policy}-warmup-w{w}", "sampling_params": {
                        "temperature": 0, "max_new_tokens": args.warmup_tokens, "ignore_eos": True}}),
                    range(len(ports))))
        before = kara_states(ports)

        rng = random.Random(args.seed)
        convs = [words(rng, args.system) + " " + words(rng, args.tool) for _ in range(args.conversations)]
        tools = [[words(rng, args.tool) for _ in range(args.turns)] for _ in convs]
        sampling = {"temperature": 0, "max_new_tokens": args.reply, "ignore_eos": True}
        per_turn, errors = [], []
        head = {"policy": policy, "replicas": args.replicas, "router_policy": "cache_aware",
                "startup_s": startup, "turns": per_turn, "errors": errors, "complete": False}

        def send(i, turn, text):
            rid = f"{policy}-c{i}-t{turn + 1}"
            try:
                return post(base + "/generate", {"text": text, "rid": rid, "sampling_params": sampling})
            except (urllib.error.HTTPError, OSError) as err:
                body = err.read().decode(errors="replace")[:300] if isinstance(err, urllib.error.HTTPError) else ""
                errors.append({"rid": rid, "error": f"{err} {body}".strip()})
                return None

        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(convs)) as pool:
            for turn in range(args.turns):
                outs = list(pool.map(lambda ic: send(ic[0], turn, ic[1]), enumerate(convs)))
                if any(o is None for o in outs):
                    break  # a conversation without its reply cannot go on
                prompt = sum(o["meta_info"]["prompt_tokens"] for o in outs)
                cached = sum(o["meta_info"]["cached_tokens"] for o in outs)
                evicted = [o["meta_info"].get("kv_tokens_evicted") for o in outs]
                evicted = sum((e[-1] if isinstance(e, list) else e) or 0 for e in evicted)
                per_turn.append({"turn": turn + 1, "prompt_tokens": prompt, "cached_tokens": cached,
                                 "hit_ratio": cached / prompt, "reply_tokens_evicted": evicted,
                                 "hit_ratio_per_conversation": [round(o["meta_info"]["cached_tokens"] /
                                                                      o["meta_info"]["prompt_tokens"], 3) for o in outs]})
                convs = [c + o["text"] + " " + tools[i][turn] for i, (c, o) in enumerate(zip(convs, outs))]
                save(dict(head, seconds=time.perf_counter() - t0))
        seconds = time.perf_counter() - t0
        opt_out = None
        if policy == "kara":  # does a per-request opt-out (sampling_params.custom_params) pass the router?
            o = post(base + "/generate", {"text": convs[0], "rid": f"{policy}-optout", "sampling_params": dict(
                sampling, custom_params={"kv_policy": "none"})})
            ev = o["meta_info"].get("kv_tokens_evicted")
            opt_out = {"reply_tokens": args.reply, "kv_tokens_evicted": ev[-1] if isinstance(ev, list) else ev}
        states = kara_states(ports)
    finally:
        stop(procs)
    # Which worker served each conversation's turns, and retractions, from the servers' logs.
    served, retracted = {}, []
    for w in range(args.replicas):
        text = (logs / f"{policy}-server{w}.log").read_text(errors="replace")
        retracted.append(text.count("Retract requests"))
        for i in range(args.conversations):
            for turn in range(args.turns):
                if f"{policy}-c{i}-t{turn + 1}'" in text or f'{policy}-c{i}-t{turn + 1}"' in text:
                    served.setdefault(f"c{i}", [None] * args.turns)[turn] = w
    later = per_turn[1:]
    return {"policy": policy, "replicas": args.replicas, "router_policy": "cache_aware", "seconds": seconds,
            "startup_s": startup, "complete": len(per_turn) == args.turns, "turns": per_turn, "worker_per_conversation_turn": dict(sorted(served.items())),
            "conversations_on_one_worker": sum(len(set(ws)) == 1 and None not in ws for ws in served.values()),
            "retractions_per_replica": retracted, "errors": errors, "opt_out_through_router": opt_out,
            "hit_ratio_after_first": sum(t["cached_tokens"] for t in later) / max(1, sum(t["prompt_tokens"] for t in later)),
            # after the warm-up (none on the CPU): the turns' compressions and the opt-out check's
            "compressions_per_replica": [s.get("compression_events", 0) - b.get("compression_events", 0)
                                         for s, b in zip(states, before)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-path", default=None, help="default: build the tiny CPU model")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--conversations", type=int, default=4)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--system", type=int, default=120, help="words of shared-nothing system prompt")
    ap.add_argument("--tool", type=int, default=20, help="words of tool output per turn")
    ap.add_argument("--reply", type=int, default=100, help="tokens generated per turn")
    ap.add_argument("--window", type=int, default=None, help="W (default: 64 on the CPU, 512 on a GPU)")
    ap.add_argument("--buffer", type=int, default=None, help="U (default: 16 on the CPU, 64 on a GPU)")
    ap.add_argument("--chunk-size", type=int, default=None, help="Token2Chunk size (default: 2 CPU, 8 GPU)")
    ap.add_argument("--keep", type=float, default=0.25)
    ap.add_argument("--max-total-tokens", type=int, default=None,
                    help="KV pool per replica (default: 20000 on the CPU, 120000 on a GPU)")
    ap.add_argument("--mem-fraction-static", type=float, default=None,
                    help="per replica (default 0.3: two replicas on one 80 GB GPU)")
    ap.add_argument("--cuda-graph-max-bs", type=int, default=32,
                    help="GPU: largest decode batch captured (also --max-running-requests)")
    ap.add_argument("--parallel-start", type=int, choices=[0, 1], default=None,
                    help="start the replicas together (default: 1 on a GPU, 0 on the CPU)")
    ap.add_argument("--warmup-tokens", type=int, default=0,
                    help="one request of this many tokens to each server before the turns (GPU: > W + U)")
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--server-arg", action="append", default=[], help="extra SGLang flag (repeatable)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--logs", default=None, help="server and router logs (default: a new temp folder)")
    args = ap.parse_args()
    for key, value in DEVICE_DEFAULTS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.parallel_start = bool(args.parallel_start)
    signal.signal(signal.SIGTERM, on_sigterm)
    if args.device == "cpu":
        from support.engines import use_cpu_sglang

        use_cpu_sglang()  # environment the servers inherit (stand-in sgl_kernel, CPU engine)
    if args.model_path is None:
        from kara_sglang.demo_model import build_tiny_model

        args.model_path = str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))
        model = "tiny random Qwen2 (kara_sglang.demo_model)"
    else:
        model = Path(args.model_path).name
    if args.logs:
        logs = Path(args.logs)
        logs.mkdir(parents=True, exist_ok=True)
    else:
        logs = Path(tempfile.mkdtemp(prefix="router-logs-"))
    device = device_name(args.device)
    settings = {k: v for k, v in vars(args).items() if k not in ("model_path", "logs")}
    rows = []

    def save(row) -> None:  # the rows so far, and this policy's row as far as it got
        if args.out:
            with open(args.out, "w") as f:
                json.dump(rows + [dict(row, device=device, model=model, settings=settings)], f, indent=1)

    for policy in args.policies:
        row = run(policy, args, logs, save)
        row.update(device=device, model=model, settings=settings)
        rows.append(row)
        print(f"{policy:8} hit ratio per turn {[round(t['hit_ratio'], 3) for t in row['turns']]} "
              f"(turns 2+: {row['hit_ratio_after_first']:.3f}) compressions per replica "
              f"{row['compressions_per_replica']} workers {row['worker_per_conversation_turn']} "
              f"retractions {row['retractions_per_replica']} errors {len(row['errors'])} "
              f"{row['seconds']:.1f} s (start-up {row['startup_s']:.1f} s)  logs {logs}", flush=True)
        if args.out:  # after each policy, so a run cut short keeps what it measured
            with open(args.out, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
