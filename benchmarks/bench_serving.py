"""Serving throughput of real SGLang with and without a KV policy (one configuration per run).

    python benchmarks/bench_serving.py --policy kara --keep-ratio 0.25 --out row.json \\
        --log-file log.txt --workload 128x1024+8192 --workload 3*128x128+448 --workload 64x1024+4096@1.5

Workload ``[K*]NxP+O[@RATE][/C][~POLICY[,keep=R][,budget=B]]``: N requests of P random prompt
tokens and O output tokens (``ignore_eos``); all offered at once, or as a seeded Poisson stream
of RATE requests/s; at most C in flight from the client when ``/C`` is given; repeated K times
(rows for each). A ``~`` suffix runs the workload's requests with their own policy settings
(per-request ``custom_params``) on the same server, so one start-up serves several Kara keep
ratios and the threshold baseline: e.g. ``96x1024+8192~kara,keep=0.125``,
``128x1024+4096~threshold,budget=1024``. Rows are written to ``--out`` after every workload,
so a run stopped by its time limit keeps the rows it finished.
Every request streams, so TTFT and inter-token latency are measured the way
``sglang.bench_serving`` does (per streamed chunk, on the client side).

Server settings of issue 17: ``--attention-backend default`` passes none (SGLang picks: fa3 on
Hopper, which needs fetch_fa3.sh's parts on the GPU machine), ``--overlap on`` leaves SGLang's
overlap scheduling on (its default; this script's default stays off, as every earlier row),
``--kv-cache-dtype fp8_e4m3`` halves the KV bytes. Each row records what the server resolved
(``attention_backend``, ``kv_cache_dtype``, ``overlap`` from ``/server_info``: a policy that turns
overlap off shows it there) next to what was asked (``*_requested``), and the ``device``.

Model: SGLang's ``--load-format dummy`` with a published shape (random weights, real shapes and
speed; ``--model-shape``: Llama-3.1-8B by default, ``deepseek-v3-cut``, ``deepseek-v2-lite``,
``gpt-oss-20b``, defined in ``model_shapes.py``; each row names it in ``model``),
``--skip-tokenizer-init`` with token ids. ``--cpu-smoke`` runs a tiny model of the shape's family
(MLA, MoE, sliding window as the shape has them) on SGLang's CPU path. Peak running requests and
KV tokens come from SGLang's own decode log lines (``--log-file`` names the file this
process's stderr goes to); compression overhead from Kara's counters in ``/server_info``.
Every configuration runs in its own process because SGLang's ``Engine.shutdown()`` ends all
schedulers of a process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

from model_shapes import SHAPES

WORKLOAD = re.compile(r"^(?:(\d+)\*)?(\d+)x(\d+)\+(\d+)(?:@([0-9.]+))?(?:/(\d+))?(?:~(\w+)((?:,\w+=[0-9.]+)*))?$")


@dataclass
class Workload:
    spec: str
    repeat: int
    num_requests: int
    prompt_len: int
    output_len: int
    request_rate: Optional[float]  # None: all at once
    max_concurrency: Optional[int]
    policy: Optional[str] = None  # per-request policy; None: the server's own settings
    keep_ratio: Optional[float] = None
    budget: Optional[int] = None

    def custom_params(self) -> Optional[dict]:
        if self.policy is None:
            return None
        params = {"kv_policy": self.policy}
        if self.keep_ratio is not None:
            params["kara_keep_ratio"] = self.keep_ratio
        if self.budget is not None:
            params["kara_budget"] = self.budget
        return params


def parse_workload(text: str) -> Workload:
    m = WORKLOAD.match(text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"workload {text!r} is not [K*]NxP+O[@RATE][/C][~POLICY[,keep=R][,budget=B]]")
    k, n, p, o, rate, conc, policy, options = m.groups()
    settings = dict(item.split("=") for item in (options or "").split(",") if item)
    unknown = set(settings) - {"keep", "budget"}
    if unknown:
        raise argparse.ArgumentTypeError(f"workload {text!r}: unknown setting(s) {sorted(unknown)}")
    return Workload(text, int(k or 1), int(n), int(p), int(o),
                    float(rate) if rate else None, int(conc) if conc else None, policy,
                    float(settings["keep"]) if "keep" in settings else None,
                    int(settings["budget"]) if "budget" in settings else None)


def percentile(values, q):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def random_ids(rng: random.Random, n: int, vocab_size: int = 128256) -> list:
    """``n`` random token ids, clear of the low and (Llama-3's) special ids and inside the
    vocabulary (dummy weights: any id works)."""
    return [rng.randrange(1000, min(120000, vocab_size)) for _ in range(n)]


async def stream_chunks(engine, ids, sampling, session_params=None):
    """A streamed generation's chunks, each holding only its new tokens (incremental streaming).
    An aborted request raises: a refused request must not pass as a short one."""
    gen = await engine.async_generate(input_ids=ids, sampling_params=sampling, stream=True,
                                      session_params=session_params)
    async for chunk in gen:
        finish = chunk["meta_info"].get("finish_reason") or {}
        if finish.get("type") == "abort":
            raise RuntimeError(f"request aborted: {finish.get('message')}")
        yield chunk


async def one_request(engine, ids, sampling, delay, gate, record):
    await asyncio.sleep(delay)
    async with gate:
        start = time.perf_counter()
        last, first, gaps, n, evicted, retractions = start, None, [], 0, 0, 0
        async for chunk in stream_chunks(engine, ids, sampling):
            now = time.perf_counter()
            got = len(chunk["output_ids"])
            meta = chunk["meta_info"]
            retractions = meta.get("num_retractions", retractions)
            evicted = (meta.get("kv_tokens_evicted") or [evicted])[-1]
            if got == 0:
                continue
            if first is None:
                first = now - start
            else:
                gaps.append((now - last) / got)
            last, n = now, n + got
        record.append({"ttft": first, "gaps": gaps, "tokens": n, "latency": last - start,
                       "retractions": retractions, "evicted": evicted})


async def profile_later(engine, at_s: float, steps: int, out_dir: str):
    """SGLang's own torch profiler over `steps` forward passes, started `at_s` seconds into the
    workload (the steady decode phase); it stops itself and writes a .trace.json.gz to out_dir."""
    from sglang.srt.managers.io_struct import ProfileReq

    await asyncio.sleep(at_s)
    os.makedirs(out_dir, exist_ok=True)
    print(f"BENCH-PROFILE start {steps} steps -> {out_dir}", file=sys.stderr, flush=True)
    await engine.tokenizer_manager.start_profile(ProfileReq(
        output_dir=out_dir, num_steps=steps, activities=["CPU", "GPU"], with_stack=False, record_shapes=False))


async def run_workload(engine, w: Workload, rng: random.Random, vocab_size: int, profile=None):
    prompts = [random_ids(rng, w.prompt_len, vocab_size) for _ in range(w.num_requests)]
    sampling = {"temperature": 0, "max_new_tokens": w.output_len, "ignore_eos": True}
    if w.custom_params():
        sampling["custom_params"] = w.custom_params()
    delays, t = [], 0.0
    for _ in prompts:
        delays.append(t)
        if w.request_rate:
            t += rng.expovariate(w.request_rate)
    gate = asyncio.Semaphore(w.max_concurrency or len(prompts))
    record = []
    t0 = time.perf_counter()
    profiler = asyncio.ensure_future(profile_later(engine, *profile)) if profile else None
    await asyncio.gather(*(one_request(engine, p, sampling, d, gate, record)
                           for p, d in zip(prompts, delays)))
    if profiler is not None and not profiler.done():
        profiler.cancel()  # asked for later than the workload lasted: say so rather than wait
        print("BENCH-PROFILE not started: the workload ended first", file=sys.stderr, flush=True)
    elif profiler is not None:
        profiler.result()  # a failed start fails loudly
    return time.perf_counter() - t0, record


def kara_counters(engine) -> dict:
    state = engine.get_server_info()["internal_states"][0].get("kara", {})
    return {k: state.get(k, 0) for k in ("decode_steps", "hook_host_s", "compress_s", "compression_events",
                                         "score_allreduces", "score_allreduce_host_s",
                                         "recall_tier_tokens_stored", "recall_tier_fallback_tokens",
                                         "recall_tier_dropped_tokens", "recall_buffer_fills", "recall_buffer_picks",
                                         "recall_buffer_picks_written")}


def add_server_args(ap: argparse.ArgumentParser) -> None:
    """The server's settings (shared with benchmarks/agent/bench_agent.py)."""
    ap.add_argument("--policy", default="none")
    ap.add_argument("--recall-tokens", type=int, default=0,
                    help="kara recall: evicted tokens attended again per layer and KV head (the emulation, without a tier, runs without CUDA graphs)")
    ap.add_argument("--recall-tier-tokens", type=int, default=0, help="kara recall: the GPU tier's tokens (0: emulation)")
    ap.add_argument("--recall-kv", default="exact", help="kara recall: the tier's / recalled K and V precision")
    ap.add_argument("--recall-pages", type=int, default=0,
                    help="kara recall tier: 16-token pages kept by the first of two ranking stages (0: one stage)")
    ap.add_argument("--recall-horizon", type=int, default=0,
                    help="kara recall tier: each request keeps only its last N evicted tokens in the tier (0: all)")
    ap.add_argument("--keep-ratio", type=float, default=None)
    ap.add_argument("--budget", type=int, default=None)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--buffer", type=int, default=None,
                    help="Kara's U (default: the server's: 64, or the sliding window + 1 on hybrid SWA models)")
    ap.add_argument("--attention-backend", default="triton",
                    help="SGLang's backend (triton, fa3, flashinfer, ...); 'default': no flag, SGLang picks")
    ap.add_argument("--overlap", choices=("on", "off"), default="off",
                    help="overlap scheduling: on is SGLang's default; off passes --disable-overlap-schedule")
    ap.add_argument("--kv-cache-dtype", default="auto", help="SGLang --kv-cache-dtype (auto, fp8_e4m3, ...)")
    ap.add_argument("--mem-fraction-static", type=float, default=0.85)
    ap.add_argument("--max-running-requests", type=int, default=256)
    ap.add_argument("--cuda-graph-max-bs", type=int, default=None,
                    help="SGLang --cuda-graph-max-bs-decode (default: SGLang's; raise with --max-running-requests)")
    ap.add_argument("--context-length", type=int, default=None,
                    help="SGLang's --context-length (a recall tier ranks each row over its width inside CUDA graphs)")
    ap.add_argument("--max-total-tokens", type=int, default=None,
                    help="pin the KV pool size (same workload fit on an H100 and an H200)")
    ap.add_argument("--disable-prefill-cuda-graph", action="store_true",
                    help="skip capturing prefill CUDA graphs (86 s of a cold start-up; decode graphs stay)")
    ap.add_argument("--log-file", default=None, help="where this process's stderr goes (for peaks)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp-size", type=int, default=1, help="SGLang --tp-size (one GPU per rank)")
    ap.add_argument("--dp-size", type=int, default=1, help="SGLang --dp-size (replicas)")
    ap.add_argument("--model-shape", choices=sorted(SHAPES), default="llama-3.1-8b",
                    help="the published shape loaded with dummy weights (model_shapes.py)")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="check this script on a CPU: a tiny model of the shape's family and features, tiny pool")


def start_engine(args, **extra):
    """One sglang.Engine for the run's settings; returns it, the resolved settings (device,
    release, pool, backend, KV dtype, overlap) and its start-up seconds."""
    model_shape = SHAPES[args.model_shape]
    shape, device_args = dict(model_shape.config), {}
    if args.cpu_smoke:
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
        from support.engines import use_cpu_sglang

        use_cpu_sglang()
        if model_shape.cpu_plugin:  # the schedulers SGLang spawns load plugins from PYTHONPATH
            os.environ["PYTHONPATH"] = os.pathsep.join([str(model_shape.cpu_plugin), os.environ["PYTHONPATH"]])
            sys.path.insert(0, str(model_shape.cpu_plugin))
        shape = model_shape.cpu_config()
        device_args = dict(device="cpu", disable_cuda_graph=True, max_total_tokens=6000,
                           **{k: v for k, v in model_shape.cpu_engine_args.items() if k != "attention_backend"})
        args.attention_backend = model_shape.cpu_engine_args["attention_backend"]
    if args.max_total_tokens:
        device_args["max_total_tokens"] = args.max_total_tokens
    if args.context_length:
        device_args["context_length"] = args.context_length

    import sglang
    import torch

    model_dir = tempfile.mkdtemp()
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(shape, f)
    kara = {}
    if args.policy != "none":
        kara = dict(kv_policy=args.policy, kara_window=args.window, kara_buffer=args.buffer)
        if args.keep_ratio is not None:
            kara["kara_keep_ratio"] = args.keep_ratio
        if args.budget is not None:
            kara["kara_budget"] = args.budget
        if args.recall_tokens:
            kara.update(kara_recall_tokens=args.recall_tokens, kara_recall_tier_tokens=args.recall_tier_tokens,
                        kara_recall_kv=args.recall_kv, kara_recall_pages=args.recall_pages,
                        kara_recall_horizon=args.recall_horizon)
            if not args.recall_tier_tokens:
                device_args["disable_cuda_graph"] = True  # the emulation's attention is not graph-capturable
    print("BENCH-CONFIG " + json.dumps(vars(args), default=lambda o: getattr(o, "spec", str(o))), file=sys.stderr, flush=True)
    t0 = time.time()
    engine = sglang.Engine(
        model_path=model_dir, load_format="dummy", skip_tokenizer_init=True,
        attention_backend=None if args.attention_backend == "default" else args.attention_backend,
        kv_cache_dtype=args.kv_cache_dtype, sampling_backend="pytorch", grammar_backend="none",
        mem_fraction_static=args.mem_fraction_static, max_running_requests=args.max_running_requests,
        disable_overlap_schedule=args.overlap == "off", incremental_streaming_output=True, decode_log_interval=10, log_level="info", random_seed=0, tp_size=args.tp_size, dp_size=args.dp_size,
        disable_prefill_cuda_graph=args.disable_prefill_cuda_graph,
        **({"cuda_graph_max_bs_decode": args.cuda_graph_max_bs} if args.cuda_graph_max_bs else {}),
        **device_args, **kara, **extra)
    startup = time.time() - t0
    info = engine.get_server_info()
    max_total_tokens = info["internal_states"][0]["kara"]["max_total_tokens"]
    if args.policy != "none" and args.buffer is None:  # the U the server chose, for the rows
        args.buffer = info["internal_states"][0]["kara"]["config"]["buffer"]
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    model = args.model_shape + ("-cpu-smoke" if args.cpu_smoke else "")
    env = {"device": device, "sglang_version": sglang.__version__, "max_total_tokens": max_total_tokens,
           "model": model,
           **resolved_settings(info, args)}
    # For rows rebuilt from this log when the process is killed before writing them.
    print("BENCH-ENV " + json.dumps(env), file=sys.stderr, flush=True)
    return engine, env, startup


def main() -> None:
    ap = argparse.ArgumentParser()
    add_server_args(ap)
    ap.add_argument("--workload", type=parse_workload, action="append", required=True,
                    help="[K*]NxPROMPT+OUTPUT[@RATE][/CONCURRENCY][~POLICY[,keep=R][,budget=B]]")
    ap.add_argument("--warmup", type=parse_workload, default=parse_workload("16x256+640"),
                    help="run first, not recorded (JIT, caches; past W + U so compression kernels compile here)")
    ap.add_argument("--profile-at", type=float, default=None,
                    help="profile the first measured workload, starting this many seconds into it")
    ap.add_argument("--profile-steps", type=int, default=20, help="forward passes to profile")
    args = ap.parse_args()
    engine, env, startup = start_engine(args)
    max_total_tokens = env["max_total_tokens"]
    vocab_size = SHAPES[args.model_shape].config["vocab_size"]  # --cpu-smoke keeps the shape's
    rows = []
    rng = random.Random(0)
    loop = engine.loop  # the tokenizer manager's receive loop runs on the engine's own loop
    for w in [args.warmup] + args.workload:
        for rep in range(w.repeat):
            tag = f"{w.spec}#{rep}"
            before = kara_counters(engine)
            print(f"BENCH-START {tag}", file=sys.stderr, flush=True)
            profile = None
            if args.profile_at is not None and w is not args.warmup and not rows:
                profile = (args.profile_at, args.profile_steps, os.path.splitext(args.out)[0] + "-profile")
            wall, record = loop.run_until_complete(run_workload(engine, w, rng, vocab_size, profile))
            print(f"BENCH-END {tag}", file=sys.stderr, flush=True)
            if w is args.warmup:
                continue
            after = kara_counters(engine)
            spent = {k: after[k] - before[k] for k in after}
            produced = sum(r["tokens"] for r in record)
            gaps = [g for r in record for g in r["gaps"]]
            ttfts = [r["ttft"] for r in record if r["ttft"] is not None]
            policy = w.policy or args.policy
            rows.append({
                "policy": policy if policy != "none" else "vanilla",
                "keep_ratio": (w.keep_ratio or args.keep_ratio) if policy in ("kara", "cask") else None,
                "budget": w.budget if w.policy else args.budget,
                "window": args.window if policy != "none" else None,
                "buffer": args.buffer if policy != "none" else None, "workload": tag,
                "prompt_len": w.prompt_len, "output_len": w.output_len, "num_requests": w.num_requests,
                "request_rate": w.request_rate, "max_concurrency": w.max_concurrency,
                "wall_s": wall, "output_tok_per_s": produced / wall,
                "ttft_mean_s": statistics.fmean(ttfts), "ttft_p99_s": percentile(ttfts, 99),
                "itl_mean_ms": 1e3 * statistics.fmean(gaps) if gaps else None,
                "itl_p50_ms": 1e3 * percentile(gaps, 50) if gaps else None,
                "itl_p99_ms": 1e3 * percentile(gaps, 99) if gaps else None,
                "retractions": sum(r["retractions"] for r in record),
                "kv_tokens_evicted": sum(r["evicted"] for r in record),
                "decode_steps": spent["decode_steps"], "kara_hook_host_s": spent["hook_host_s"],
                "kara_compress_gpu_s": spent["compress_s"],
                "compression_events": spent["compression_events"],
                # Tensor parallelism: ranks, and the per-step score all-reduces (kara_sglang/tp.py).
                "tp_size": args.tp_size, "dp_size": args.dp_size,
                "score_allreduces": spent["score_allreduces"],
                "score_allreduce_host_s": spent["score_allreduce_host_s"],
                "server_policy": args.policy, "startup_s": startup,
                "recall_tokens": args.recall_tokens, "recall_tier_tokens": args.recall_tier_tokens,
                "recall_kv": args.recall_kv if args.recall_tokens else None, "recall_pages": args.recall_pages,
                "recall_tier_tokens_stored": spent["recall_tier_tokens_stored"],
                "recall_tier_fallback_tokens": spent["recall_tier_fallback_tokens"],
                "recall_horizon": args.recall_horizon,
                "recall_tier_dropped_tokens": spent["recall_tier_dropped_tokens"],
                "recall_buffer_fills": spent["recall_buffer_fills"],
                "recall_buffer_picks": spent["recall_buffer_picks"],
                "recall_buffer_picks_written": spent["recall_buffer_picks_written"],
                "mem_fraction_static": args.mem_fraction_static, "max_total_tokens": max_total_tokens,
                "context_length": args.context_length,
                "max_running_requests": args.max_running_requests,
                "prefill_cuda_graph": not args.disable_prefill_cuda_graph,
                **env,  # device, SGLang version, pool; backend, KV dtype and overlap as resolved
                "attention_backend_requested": args.attention_backend,
                "kv_cache_dtype_requested": args.kv_cache_dtype, "overlap_requested": args.overlap == "on",
            })
            print(json.dumps(rows[-1]), flush=True)
            write_rows(rows, args)
    engine.shutdown()
    write_rows(rows, args)


def resolved_settings(info: dict, args) -> dict:
    """Attention backend, KV dtype and overlap scheduling as the server resolved them (its
    /server_info), else (older SGLang) SGLang's own "Use X backend by default" log line, else
    what was asked."""
    backend = info.get("decode_attention_backend") or info.get("attention_backend")
    if not backend and args.log_file:
        sys.stderr.flush()
        m = re.search(r"Use (\S+) backend by default", open(args.log_file, errors="replace").read())
        backend = m.group(1) if m else None
    overlap = info.get("disable_overlap_schedule")
    return {"attention_backend": backend or args.attention_backend,
            "kv_cache_dtype": info.get("kv_cache_dtype") or args.kv_cache_dtype,
            "overlap": args.overlap == "on" if overlap is None else not overlap}


def write_rows(rows, args) -> None:
    """Rows so far, with the peaks SGLang's decode log shows for each finished workload."""
    if args.log_file:
        sys.stderr.flush()
        peaks = peaks_from_log(open(args.log_file, errors="replace").read())
        for row in rows:
            row.update(peaks.get(row["workload"], {}))
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
            # Hybrid sliding-window pools log the full-attention layers' tokens as "#full token".
            m = re.search(r"Decode batch.*#running-req: (\d+), #(?:full )?token: (\d+)", line)
            if m:
                p = peaks[current]
                p["peak_running_requests"] = max(p["peak_running_requests"], int(m.group(1)))
                p["peak_kv_tokens"] = max(p["peak_kv_tokens"], int(m.group(2)))
    return peaks


if __name__ == "__main__":
    main()
