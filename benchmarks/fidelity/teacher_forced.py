"""Teacher-forced fidelity and needle-in-its-own-CoT recall, per KV policy, through real SGLang.

    python benchmarks/fidelity/prepare_smollm2.py
    python benchmarks/fidelity/teacher_forced.py --out docs/results/fidelity.json --plot docs/fidelity.png

1. Reference: the full-KV (``--kv-policy none``) greedy continuation of each prompt.
2. Every policy then consumes exactly those tokens (teacher forcing, see ``teacher_forcing.py``)
   while its KV is compressed; per position we record the log-likelihood of the reference
   token and whether the compressed model's argmax equals it. A full-KV teacher-forced run is
   the self-check: its top-1 agreement must be 100%.
3. Needle in its own chain of thought: the forced context is the model's own generation cut
   at length ``L``; a line the model wrote at depth ``d`` of it is the needle. A forced
   follow-up user turn asks to repeat the answer from there, quoting its first ``P`` tokens,
   and the assistant turn is forced to start with them; the next ``K`` tokens are scored. "Exact
   recall" means the argmax was right at all ``K`` of them, which is exactly when greedy
   decoding would have reproduced the line. Grid: ``L`` x ``d`` (Figure 6 of the paper, CPU-sized).

Kara runs its keep ratios and gamma as per-request overrides of one engine per (W, U); the
threshold, streaming and longflow baselines get, per request, the decode budget whose average KV matches
the average KV Kara actually held (measured in the scheduler at every position). Rows are
merged into ``--out``: rows of other harnesses (``free_running.py``) are kept.

On a GPU (``KARA_TEST_DEVICE=cuda``, ``benchmarks/gpu/run_fidelity.sh``) the engines are
sized for the GPU (KV pool from the requests, prefill CUDA graphs off), rows carry the GPU's
name in ``device`` (CPU rows: ``"cpu"``), and a run can be split over processes that run side
by side: ``--raw`` names each process's raw records (``.json.gz``: compact), ``--raw-new-only``
keeps only the rows it ran, and ``--reuse A,B,...`` joins several such files (the first's
requests; every file's rows, the first of a label wins).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(HERE))

MODEL_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)"
HARNESS = "teacher_forced"
POLICIES = ["full", "kara", "threshold", "streaming", "longflow", "cask"]  # table order

# Prompts whose greedy continuations are long, varied and line-structured (needles are lines).
# (The free-running harness's animal list is left out: SmolLM2-135M soon repeats one animal,
# and a repeated line is predictable without the needle.)
PROMPTS = [
    "Write a very long, detailed story about a lighthouse keeper and a storm.",
    "Explain step by step, in great detail, how to bake bread at home.",
    "List 100 famous cities of the world with their country, one per line.",
    "Write a long travel journal of a trip through ten countries, one entry per day.",
]
QUESTION = 'Repeat word for word the part of your answer that starts with "{prefix}".'
T0 = time.time()


def log(msg: str) -> None:
    """A line with the wall clock and the seconds since this process started (GPU time budget)."""
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:5.0f}s] {msg}", flush=True)


# ------------------------------------------------------------------------- raw records
def read_raw(path) -> dict:
    path = Path(path)
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return json.loads(text)


def write_raw(path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, default=str)
    tmp = path.with_name(path.name + ".tmp")  # a process killed mid-write keeps the last whole file
    tmp.write_bytes(gzip.compress(text.encode(), 6) if path.suffix == ".gz" else text.encode())
    tmp.replace(path)


def pack(o, rec, compact):
    """One request's stored form: its meta_info and records (compact: columns, small meta)."""
    meta = o["meta_info"]
    if not compact:
        return [meta, rec]
    small = {k: (v[-1] if isinstance(v, list) and v else v) for k, v in meta.items()
             if k in ("prompt_tokens", "completion_tokens", "kv_tokens_kept", "kv_tokens_evicted")}
    # logp to 8 significant digits: the processor computes it in float32 (about 7).
    return [small, {"logp": [float(f"{x['logp']:.8g}") for x in rec], "argmax": [x["argmax"] for x in rec],
                    "kv": [x["kv"] for x in rec]}]


def unpack(item, request):
    """(output, records) of one stored request, in either stored form."""
    meta, rec = item
    if isinstance(rec, dict):  # compact: rebuild the processor's records
        forced = request["forced"]
        rec = [{"pos": p, "ref": int(forced[p]) if p < len(forced) else -1, "argmax": a, "logp": lp, "kv": kv}
               for p, (lp, a, kv) in enumerate(zip(rec["logp"], rec["argmax"], rec["kv"]))]
    return {"meta_info": meta}, rec


def engine_kwargs(requests, base_tokens: int, mem_fraction_static: float) -> dict:
    """CPU: the pool sizes the CPU runs used. GPU: a pool that holds every request at full
    length at once (no request ever waits or is retracted: a retracted request would be
    re-prefilled with full KV and change what is measured), prefill CUDA graphs off (their
    capture costs start-up time; every request here is one short prefill and a long decode)."""
    from support.engines import ON_GPU

    if not ON_GPU:
        return dict(max_total_tokens=base_tokens)
    need = sum(len(r["input_ids"]) + len(r["forced"]) + r.get("free", 0) + 8 for r in requests)
    return dict(max_total_tokens=need + 4096, mem_fraction_static=mem_fraction_static,
                disable_prefill_cuda_graph=True, max_running_requests=max(64, len(requests) + 8))


# ------------------------------------------------------------------------- requests
def needle_request(tok, prompt_ids, ref, length, depth, prefix_len, answer_len):
    """Forced ids for one needle probe, and where the scored answer tokens sit in them."""
    ctx = list(ref[:length])
    lo = int(round(depth * length))
    hi = length - prefix_len - answer_len
    text_of = lambda ids: tok.decode(ids)

    def unique(s):
        gram = ctx[s:s + prefix_len]
        return sum(ctx[i:i + prefix_len] == gram for i in range(len(ctx) - prefix_len + 1)) == 1

    def ok(s):
        needle = text_of(ctx[s:s + prefix_len + answer_len])
        return unique(s) and needle.strip() and "\n" not in text_of(ctx[s:s + prefix_len])

    starts = [s for s in range(max(1, lo), max(lo + 1, hi)) if s <= hi]
    line_starts = [s for s in starts if text_of(ctx[s - 1:s]).endswith("\n") and ok(s)]
    sentence_starts = [s for s in starts if text_of(ctx[s - 1:s]).rstrip(" ").endswith((".", "!", "?"))
                       and ok(s)]
    any_starts = [s for s in starts if ok(s)]
    for pool in (line_starts, sentence_starts, any_starts):
        # Take the nearest candidate after the requested depth, within 10% of L.
        near = [s for s in pool if s - lo <= max(16, length // 10)]
        if near:
            s = near[0]
            break
    else:
        s = any_starts[0] if any_starts else lo
    prefix = ctx[s:s + prefix_len]
    question = tok.encode("<|im_end|>\n<|im_start|>user\n" + QUESTION.format(prefix=text_of(prefix).strip())
                          + "<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    forced = ctx + question + ctx[s:s + prefix_len + answer_len]
    first = len(ctx) + len(question) + prefix_len
    return {"input_ids": prompt_ids, "forced": forced, "score": (first, first + answer_len),
            "needle_pos": s, "length": length, "depth": depth,
            "needle": text_of(ctx[s:s + prefix_len + answer_len])}


# ------------------------------------------------------------------------- engines
def run_engine(model, engine_args, requests, per_request_params, engine=None, mem_fraction_static=0.85):
    """One engine: the requests teacher-forced, each with its own custom_params overrides
    (``engine``: use this running engine, and shut it down after)."""
    import teacher_forcing as tf
    from support.engines import make_engine

    batch = [dict(r, params=p) for r in requests for p in per_request_params]
    if engine is None:
        t0 = time.time()
        engine = make_engine(model, **tf.ENGINE_ARGS,
                             **engine_kwargs(batch, 100000, mem_fraction_static), **engine_args)
        log(f"  engine {engine_args or 'none'} started in {time.time() - t0:.0f} s")
    try:
        t0 = time.time()
        outs, recs = tf.teacher_forced(engine, batch)
        log(f"  {len(batch)} requests, {sum(len(r['forced']) for r in batch)} tokens, "
            f"{time.time() - t0:.0f} s")
    finally:
        engine.shutdown()
    n = len(per_request_params)
    # results[j][i]: request i under overrides j
    return [[(outs[i * n + j], recs[i * n + j]) for i in range(len(requests))] for j in range(n)]


def decode_held(rec, prompt_len):
    """Decode tokens whose KV was held when position ``rec['pos']`` was predicted."""
    return rec["pos"] if rec["kv"] is None else rec["kv"] - prompt_len


def threshold_mean_kv(budget, buffer, positions):
    """Average decode KV a fixed-budget policy holds: it grows to budget+U, compresses to budget."""
    total = 0
    for t in positions:
        total += t if t < budget + buffer else budget + (t - budget) % buffer
    return total / len(positions)


def matched_budget(target_mean, buffer, positions):
    return min(range(1, max(positions) + 1),
               key=lambda b: abs(threshold_mean_kv(b, buffer, positions) - target_mean))


# ------------------------------------------------------------------------- metrics
def first_compression(requests, results):
    """Latest position, over the curve requests, at which the KV held first shrank (None: never)."""
    firsts = []
    for r, (o, rec) in zip(requests, results):
        if not r["curve"]:
            continue
        held = [decode_held(x, o["meta_info"]["prompt_tokens"]) for x in rec]
        firsts.append(next((p for p in range(1, len(held)) if held[p] < held[p - 1]), None))
    return None if not firsts or None in firsts else max(firsts)


def summarise(requests, results, buckets, all_compressed_from=None):
    """Metrics of one configuration: {metric: value}.

    ``all_compressed_from``: the position from which every compared policy has compressed at
    least once (measured); the ``@after_all_compressed`` metrics cover [it, end), where the
    rows differ in how well they choose rather than in when they start.
    """
    m = {}
    curve = [(r, o, rec) for r, (o, rec) in zip(requests, results) if r["curve"]]
    spans = [("", 0, buckets[-1])] + [(f"@[{lo},{hi})", lo, hi) for lo, hi in zip(buckets[:-1], buckets[1:])]
    if all_compressed_from is not None:
        spans.append(("@after_all_compressed", all_compressed_from, buckets[-1]))
    for tag, lo, hi in spans:
        recs = [x for _, _, rec in curve for x in rec[lo:hi]]
        nll = -sum(x["logp"] for x in recs) / len(recs)
        m["tf_top1_agreement" + tag] = sum(x["argmax"] == x["ref"] for x in recs) / len(recs)
        m["tf_nll" + tag] = nll
        if not tag:
            m["tf_perplexity"] = math.exp(nll)
    held, seen = [], []
    for r, o, rec in curve:
        held += [decode_held(x, o["meta_info"]["prompt_tokens"]) for x in rec[:buckets[-1]]]
        seen += [x["pos"] for x in rec[:buckets[-1]]]
    m["kv_decode_mean_tokens"] = sum(held) / len(held)
    m["kv_decode_mean_fraction"] = sum(held) / max(1, sum(seen))
    needles = [(r, rec) for r, (o, rec) in zip(requests, results) if r.get("score")]
    cells = {}
    for r, rec in needles:
        a, b = r["score"]
        hits = [rec[p]["argmax"] == rec[p]["ref"] for p in range(a, b)]
        nll = -sum(rec[p]["logp"] for p in range(a, b)) / (b - a)
        cells.setdefault((r["length"], r["depth"]), []).append((all(hits), sum(hits) / len(hits), nll))
    for key, vals in [("", [v for vs in cells.values() for v in vs])] + \
            [(f"@L={L},depth={d}", vs) for (L, d), vs in sorted(cells.items())]:
        m["needle_exact_recall" + key] = sum(v[0] for v in vals) / len(vals)
        m["needle_token_accuracy" + key] = sum(v[1] for v in vals) / len(vals)
        if not key:
            m["needle_nll"] = sum(v[2] for v in vals) / len(vals)
    return m


# ------------------------------------------------------------------------- plot
def plot(path, table, buckets, lengths, depths):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    mids = [(a + b) / 2 for a, b in zip(buckets[:-1], buckets[1:])]
    # One colour per row (tab20), one marker per policy; Kara and full solid, the others dashed.
    colours = [plt.cm.tab20(k % 20) for k in range(len(table))]
    markers = {"full": "o", "Kara": "o", "threshold": "s", "streaming": "^", "longflow": "D", "cask": "v"}
    for (label, m), colour in zip(table, colours):
        style = "-" if label.startswith(("full", "Kara")) else "--"
        marker = markers.get(label.split()[0], "o")
        axes[0].plot(mids, [100 * m[f"tf_top1_agreement@[{a},{b})"] for a, b in zip(buckets[:-1], buckets[1:])],
                     style, marker=marker, color=colour, label=label)
        axes[1].plot(mids, [m[f"tf_nll@[{a},{b})"] for a, b in zip(buckets[:-1], buckets[1:])],
                     style, marker=marker, color=colour, label=label)
    axes[0].set(title="Teacher-forced top-1 agreement with full KV", xlabel="decode position",
                ylabel="% positions")
    axes[1].set(title="Teacher-forced NLL of the full-KV continuation", xlabel="decode position",
                ylabel="mean NLL (nats/token)")
    axes[0].legend(fontsize=7)
    cells = [(L, d) for L in lengths for d in depths]
    width = 0.8 / len(table)
    for k, (label, m) in enumerate(table):
        axes[2].bar([i + k * width for i in range(len(cells))],
                    [100 * m[f"needle_token_accuracy@L={L},depth={d}"] for L, d in cells], width, label=label,
                    color=colours[k])
    axes[2].set_xticks([i + 0.4 - width / 2 for i in range(len(cells))],
                       [f"L={L}\nd={d}" for L, d in cells], fontsize=8)
    axes[2].set(title="Needle in its own CoT: answer-token accuracy", ylabel="% tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "data" / "models" / "smollm2-135m-instruct"))
    ap.add_argument("--lengths", default="320,640", help="generation lengths L of the needle grid")
    ap.add_argument("--depths", default="0.1,0.5,0.9", help="needle depths d in the generated part")
    ap.add_argument("--bucket", type=int, default=128, help="position bucket of the curves")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--buffers", default="32", help="Kara buffers U; the first is the baselines' too")
    ap.add_argument("--grid", choices=("cpu", "full"), default="cpu",
                    help="Kara rows: cpu = keep 0.5/0.25/0.125 at gamma 8 and 0.25 at gamma 1 for the first U, "
                         "0.25 gamma 8 for the others; full = every keep in --keeps x gamma 1 and 8, for every U")
    ap.add_argument("--keeps", default="0.5,0.25,0.125", help="Kara (and cask) keep ratios of --grid full")
    ap.add_argument("--match-keeps", default="0.5,0.25",
                    help="Kara keep ratios (gamma 8, first U) whose measured average KV the baselines' budgets match")
    ap.add_argument("--prefix-tokens", type=int, default=4)
    ap.add_argument("--answer-tokens", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results" / "fidelity.json"))
    ap.add_argument("--plot", default=str(ROOT / "docs" / "fidelity.png"))
    ap.add_argument("--policies", default=",".join(POLICIES),
                    help="policies to run now (full is the reference of every row's full_kv_value)")
    ap.add_argument("--reuse", default=None,
                    help="raw records of earlier runs at the same W (data/fidelity_teacher_forced_raw_w<W>.json; "
                         "comma-separated: joined, the first one's requests): their requests (same references, "
                         "prompts, lengths) and the records of every policy not in --policies are reused, and the "
                         "baselines' budgets are matched to their Kara rows")
    ap.add_argument("--raw", default=None,
                    help="where the raw records go (default data/fidelity_teacher_forced_raw_w<W>.json; "
                         "a .gz name writes them compact and gzipped)")
    ap.add_argument("--raw-new-only", action="store_true",
                    help="the raw file holds only the rows run now (processes side by side, joined by --reuse)")
    ap.add_argument("--mem-fraction-static", type=float, default=0.85, help="GPU only (SGLang's setting)")
    ap.add_argument("--device-label", default=None,
                    help="rows' device field (default: the GPU's name, or cpu; a --reuse run keeps the stored one)")
    return ap.parse_args()


class Run:
    """One harness run: its settings, requests, and the rows' records as engines finish them.

    ``configs`` holds one ``(label, policy, keep, window, buffer, chunk, budget, results)``
    per row; ``checkpoint()`` saves them all as raw records after every engine (data/ is
    git-ignored; on the GPU, ``--raw`` under $OUT), so a run stopped later can be finished
    or summarised with ``--reuse``.
    """

    def __init__(self, args: argparse.Namespace, on_gpu: bool) -> None:
        self.args = args
        self.lengths = [int(x) for x in args.lengths.split(",")]
        self.depths = [float(x) for x in args.depths.split(",")]
        self.buffers = [int(x) for x in args.buffers.split(",")]
        self.w, self.u = args.window, self.buffers[0]
        self.policies = [x for x in args.policies.split(",") if x]
        unknown = set(self.policies) - set(POLICIES)
        if unknown:
            raise SystemExit(f"unknown policies {sorted(unknown)}; choose from {POLICIES}")
        self.raw = Path(args.raw) if args.raw else ROOT / "data" / f"fidelity_teacher_forced_raw_w{self.w}.json"
        self.compact = self.raw.suffix == ".gz"
        self.mfs = args.mem_fraction_static
        self.device = args.device_label
        if self.device is None and on_gpu:
            import torch

            self.device = torch.cuda.get_device_name(0)
        self.configs: list = []
        self.reused: set = set()  # labels taken from --reuse
        self.requests = None
        self.buckets: list = []

    def add(self, label, policy, keep, window, buffer, chunk, budget, results) -> None:
        self.configs.append((label, policy, keep, window, buffer, chunk, budget, results))

    def checkpoint(self) -> None:
        keep = [c for c in self.configs if not (self.args.raw_new_only and c[0] in self.reused)]
        try:
            write_raw(self.raw, {"window": self.w, "device": self.device, "requests": self.requests, "configs": [
                list(c[:7]) + [[pack(o, rec, self.compact) for o, rec in c[7]]] for c in keep]})
        except (OSError, TypeError, ValueError) as err:
            print(f"  raw records not saved: {err}", flush=True)

    def run_engine(self, engine_args: dict, per_request_params: list, engine=None) -> list:
        return run_engine(self.args.model, engine_args, self.requests, per_request_params, engine=engine,
                          mem_fraction_static=self.mfs)


def load_reused(run: Run) -> None:
    """The stored run's requests (its references, prompts, lengths and needles) and the
    records of the policies not run now: rows stay comparable with the stored ones."""
    args = run.args
    for path in args.reuse.split(","):
        stored = read_raw(path)
        if stored.get("window", 128) != run.w:
            raise SystemExit(f"{path} is a W={stored.get('window', 128)} run, not W={run.w}")
        if run.requests is None:
            run.requests = stored["requests"]
            if args.device_label is None:
                run.device = stored.get("device", run.device)
        elif [r["forced"] for r in stored["requests"]] != [r["forced"] for r in run.requests]:
            raise SystemExit(f"{path}: other requests than {args.reuse.split(',')[0]} (another reference run)")
        for c in stored["configs"]:
            if c[1] not in run.policies and c[0] not in run.reused:
                run.reused.add(c[0])
                run.configs.append(tuple(c[:7]) + ([unpack(item, r) for item, r in zip(c[7], run.requests)],))
    run.lengths = sorted({r["length"] for r in run.requests})
    run.depths = sorted({r["depth"] for r in run.requests})
    log(f"reusing {args.reuse}: {len(run.requests)} requests, stored rows {[c[0] for c in run.configs]}")


def make_requests(run: Run, make_engine, flush):
    """Full-KV greedy references, then one needle probe per (prompt, L, d); the curve comes
    from the forced context of the longest L (its first max(L) positions are the reference
    continuation). Returns the reference engine when full KV runs next (one start-up less)."""
    from transformers import AutoTokenizer

    args, lengths, depths = run.args, run.lengths, run.depths
    tok = AutoTokenizer.from_pretrained(args.model)
    prompt_ids = [tok.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True)["input_ids"]
                  for t in PROMPTS[:args.prompts]]
    log("reference generation (full KV)")
    t0 = time.time()
    n_probe = len(lengths) * len(depths) * len(prompt_ids)
    sizing = [{"input_ids": p, "forced": [0] * (max(lengths) + 64)} for p in prompt_ids
              for _ in range(n_probe // len(prompt_ids))]
    engine = make_engine(args.model, **tf.ENGINE_ARGS,
                         **engine_kwargs(sizing, 100000 if "full" in run.policies else 40000, run.mfs))
    log(f"  engine started in {time.time() - t0:.0f} s")
    try:
        t0 = time.time()
        refs = [o["output_ids"] for o in engine.generate(
            input_ids=prompt_ids, sampling_params={"temperature": 0, "ignore_eos": True,
                                                   "max_new_tokens": max(lengths)})]
        log(f"  {len(prompt_ids)} references of {max(lengths)} tokens, {time.time() - t0:.0f} s")
    except BaseException:
        engine.shutdown()
        raise
    full_engine = None
    if "full" in run.policies:
        # Forget the references' KV: the self-check prefills its prompts afresh, as every
        # other row's engine does (a radix-cache hit computes the last prompt token alone).
        flush(engine)
        full_engine = engine
    else:
        engine.shutdown()
    run.requests = []
    for p, ref in zip(prompt_ids, refs):
        for L in lengths:
            for i, d in enumerate(depths):
                r = needle_request(tok, p, ref, L, d, args.prefix_tokens, args.answer_tokens)
                r["curve"] = L == max(lengths) and i == 0
                run.requests.append(r)
    run.checkpoint()  # the requests alone: the references are the expensive part to redo
    return full_engine


def run_full(run: Run, engine) -> None:
    """Full KV teacher-forced: the reference of every row, and the harness's self-check."""
    log("full KV, teacher-forced (self-check)")
    [full] = run.run_engine({}, [{}], engine=engine)
    run.add("full KV", "full", None, None, None, None, None, full)
    run.checkpoint()
    for (r, (o, rec)) in zip(run.requests, full):
        bad = [x["pos"] for x in rec[:max(run.lengths)] if x["argmax"] != x["ref"]]
        if r["curve"] and bad:
            print(f"  SELF-CHECK: full KV disagrees with its own reference at {bad[:10]}", flush=True)


def run_kara(run: Run, keeps: list) -> None:
    """One engine per U; keep ratios and gamma as per-request overrides."""
    w = run.w
    for j, b in enumerate(run.buffers):
        if run.args.grid == "full":
            grid = [(k, g) for k in keeps for g in (8, 1)]
        else:
            grid = [(0.5, 8), (0.25, 8), (0.125, 8), (0.25, 1)] if j == 0 else [(0.25, 8)]
        log(f"Kara W={w} U={b}: keep/gamma {grid}")
        res = run.run_engine(dict(kv_policy="kara", kara_window=w, kara_buffer=b),
                             [{"kara_keep_ratio": k, "kara_chunk_size": g} for k, g in grid])
        for (k, g), r in zip(grid, res):
            tag = f" U={b}" if len(run.buffers) > 1 or run.args.grid == "full" else ""
            run.add(f"Kara {k:g} γ={g}{tag}", "kara", k, w, b, g, None, r)
        run.checkpoint()


def baseline_budgets(run: Run) -> dict:
    """Per matched Kara keep ratio (gamma 8, first U): the decode budget whose average KV
    equals the average KV that Kara row actually held."""
    positions = list(range(max(run.lengths)))
    match = [float(x) for x in run.args.match_keeps.split(",") if x]
    budgets = {}
    for label, policy, k, _, b, g, _, r in run.configs:
        if policy == "kara" and g == 8 and b == run.u and k in match and k not in budgets:
            mean = summarise(run.requests, r, run.buckets)["kv_decode_mean_tokens"]
            budgets[k] = matched_budget(mean, run.u, positions)
            log(f"  Kara {k}: mean decode KV {mean:.1f} tokens -> baseline budget {budgets[k]}")
    return budgets


def run_baselines(run: Run, budgets: dict) -> None:
    """threshold, streaming and longflow at the matched budgets, U as Kara's (longflow holds
    the decode cache like threshold: grows to B + U, cut to B, so the same budgets match)."""
    for policy in ("threshold", "streaming", "longflow"):
        if policy not in run.policies:
            continue
        if not budgets:
            raise SystemExit(f"{policy}: no Kara rows at U={run.u} to match budgets to (run kara or --reuse)")
        log(f"{policy}: budgets {budgets}")
        res = run.run_engine(dict(kv_policy=policy, kara_budget=max(budgets.values()), kara_buffer=run.u),
                             [{"kara_budget": b} for b in budgets.values()])
        for (k, b), r in zip(budgets.items(), res):
            run.add(f"{policy} B={b} (≈Kara {k:g})", policy, None, None, run.u, None, b, r)
        run.checkpoint()


def run_cask(run: Run, keeps: list) -> None:
    """cask is a window policy like Kara (same W, U, trigger, scorer): same keep ratios, its
    own merged scratch instead of Token2Chunk (core fraction 0.5, the default)."""
    cask_keeps = keeps if run.args.grid == "full" else [0.5, 0.25, 0.125]
    log(f"cask W={run.w} U={run.u}: keep {cask_keeps}")
    res = run.run_engine(dict(kv_policy="cask", kara_window=run.w, kara_buffer=run.u),
                         [{"kara_keep_ratio": k} for k in cask_keeps])
    for k, r in zip(cask_keeps, res):
        run.add(f"cask {k:g}", "cask", k, run.w, run.u, None, None, r)


def write_results(run: Run) -> None:
    """Rows into --out (replacing this W's and device's earlier rows), table, plot."""
    args, requests, buckets = run.args, run.requests, run.buckets
    full = next((c[7] for c in run.configs if c[1] == "full"), None)
    if full is None:
        raise SystemExit("no full-KV records: run full or --reuse a run that has them")
    firsts = {c[0]: first_compression(requests, c[7]) for c in run.configs if c[1] != "full"}
    late = max((f for f in firsts.values() if f is not None), default=None)
    if late is not None:
        print(f"first compression (latest curve request) per row: {firsts}; every row has compressed "
              f"from position {late}", flush=True)
    full_m = summarise(requests, full, buckets, late)
    rows, table = [], []
    for label, policy, k, win, b, g, budget, r in run.configs:
        # (No record before Kara's first decode step: nothing was compressed yet.)
        if policy != "full" and any(rec[-1]["kv"] is None for _, rec in r):
            # The processor reads Kara's window state; without it the KV held is not measured.
            raise RuntimeError(f"{label}: the KV held was not recorded (Kara's request state moved?)")
        m = summarise(requests, r, buckets, late)
        if late is not None:
            m["all_compressed_from"] = late
            m["first_compression_pos"] = firsts.get(label) if policy != "full" else None
        m["window"] = win
        table.append((label, m))
        print(f"{label:28s} top1 {100 * m['tf_top1_agreement']:6.2f}%  nll {m['tf_nll']:.4f}  "
              f"KV {100 * m['kv_decode_mean_fraction']:5.1f}%  needle exact {100 * m['needle_exact_recall']:5.1f}%  "
              f"tokens {100 * m['needle_token_accuracy']:5.1f}%", flush=True)
        for metric, value in m.items():
            if metric == "window":
                continue
            row = {"policy": policy, "keep_ratio": k, "window": win, "buffer": b, "chunk": g,
                   "budget": budget, "model": MODEL_NAME, "metric": metric, "value": value,
                   "full_kv_value": full_m.get(metric), "harness": HARNESS, "run_window": run.w}
            if run.device != "cpu":  # CPU rows stay as they were stored (no device field means cpu)
                row["device"] = run.device
            rows.append(row)
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else []
    # A run replaces the rows of the earlier run at the same Kara window W on the same device
    # (its baselines are matched to that W); rows of other windows, devices and harnesses stay.
    merged = [row for row in old if row.get("harness") != HARNESS or row.get("run_window", 128) != run.w
              or row.get("device", "cpu") != run.device] + rows
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(merged, indent=1))
    lengths, depths = run.lengths, run.depths
    needles = [{"prompt": i // (len(lengths) * len(depths)), "L": r["length"], "depth": r["depth"],
                "needle_pos": r["needle_pos"], "needle": r["needle"]} for i, r in enumerate(requests)]
    print(json.dumps(needles, ensure_ascii=False), flush=True)
    if args.plot:
        plot(args.plot, table, buckets, lengths, depths)


def main() -> None:
    args = parse_args()
    import teacher_forcing as tf
    from support.engines import ON_GPU, flush, make_engine, use_cpu_sglang

    use_cpu_sglang()
    os.environ.pop("KARA_DEBUG_CHECKS", None)
    if ON_GPU:  # SGLang's per-step pool checks (the test suites' setting) scale with the GPU-sized pool
        for var in ("SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY", "SGLANG_CHECK_KV_PAGE_INVARIANTS"):
            os.environ.pop(var, None)
    tf.importable()
    t_start = time.time()
    run = Run(args, ON_GPU)
    if args.reuse:
        load_reused(run)
    run.device = run.device or "cpu"
    run.buckets = list(range(0, max(run.lengths) + 1, args.bucket))
    if run.buckets[-1] != max(run.lengths):
        run.buckets.append(max(run.lengths))

    full_engine = None if args.reuse else make_requests(run, make_engine, flush)
    if "full" in run.policies:
        run_full(run, full_engine)
    keeps = [float(x) for x in args.keeps.split(",")]
    if "kara" in run.policies:
        run_kara(run, keeps)
    run_baselines(run, baseline_budgets(run))
    if "cask" in run.policies:
        run_cask(run, keeps)
    run.configs.sort(key=lambda c: POLICIES.index(c[1]))
    run.checkpoint()  # cask's engine included
    write_results(run)
    log(f"total {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
