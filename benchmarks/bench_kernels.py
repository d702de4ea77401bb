"""Time the Kara kernels on a GPU against their rooflines (Llama-3.1-8B shapes).

    python benchmarks/bench_kernels.py [--out results.json] [--quick]

Prints, for the scorer: bytes moved, executed FLOPs, achieved GB/s and TFLOP/s, and the
fraction of its roofline (the larger of bytes over the measured copy bandwidth and FLOPs
over the measured bf16 matmul rate). Then the whole compression of a batch of windows
(scorer + Token2Chunk + req_to_token rewrite, and the paged compaction of every layer),
amortised over the W decode steps that produce a window, against the roofline time of an
8B decode step at the same batch. Timings: ``triton.testing.do_bench``, median.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import triton

from kara_kernels import window_scores, window_scores_reference
from kara_sglang.compressor import Compressor, DueRequest, KVLayout
from kara_sglang.config import KaraConfig
from kara_sglang.policies import make_policy
from kara_sglang.query_buffer import QueryBuffer
from kara_sglang.window import CompressionTask

# Llama-3.1-8B
LAYERS, Q_HEADS, KV_HEADS, HEAD_DIM = 32, 32, 8, 128
WEIGHT_BYTES = 8.03e9 * 2
KV_BYTES_PER_TOKEN = LAYERS * 2 * KV_HEADS * HEAD_DIM * 2
PROMPT = 1024


def median_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def measure_ceilings() -> dict:
    """Device-to-device copy bandwidth and bf16 matmul rate, measured here."""
    src = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src))
    copy_bw = 2 * src.numel() * 2 / (copy_ms * 1e-3)
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = median_ms(lambda: a @ b)
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {"copy_GBps": copy_bw / 1e9, "matmul_TFLOPs": 2 * n ** 3 / (mm_ms * 1e-3) / 1e12}


def check_scorer(q_heads_stored: int, window: int, buffer: int, n_windows: int = 4) -> float:
    """Relative error of the bf16 kernel against float64 on fresh random inputs."""
    n_vote, slots = 2, 4 * window
    q = torch.randn(n_windows, n_vote, window + buffer, q_heads_stored, HEAD_DIM,
                    device="cuda", dtype=torch.bfloat16) * 2
    k = [torch.randn(slots, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) * 2
         for _ in range(n_vote)]
    key_slots = torch.stack([torch.randperm(slots, device="cuda")[:window] for _ in range(n_windows)])
    rows = torch.arange(n_windows, device="cuda", dtype=torch.int32)
    out = window_scores(q, rows, k, key_slots, HEAD_DIM ** -0.5)
    ref = window_scores_reference(q.cpu(), rows.cpu(), [x.cpu() for x in k], key_slots.cpu(), HEAD_DIM ** -0.5)
    assert torch.isfinite(out).all()
    return float((out.double().cpu() - ref).norm() / ref.norm())


def bench_scorer(window: int, buffer: int, batch: int, vote_heads: str, n_vote: int, ceil: dict,
                 **launch) -> dict:
    stored = KV_HEADS if vote_heads == "group" else Q_HEADS
    n_q = window + buffer
    slots = batch * (window + 64)
    q = torch.randn(batch, n_vote, n_q, stored, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = [torch.randn(slots, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(n_vote)]
    key_slots = torch.randperm(slots, device="cuda")[: batch * window].view(batch, window).to(torch.int32)
    rows = torch.arange(batch, device="cuda", dtype=torch.int32)
    out = torch.zeros(batch, window, device="cuda")
    ms = median_ms(lambda: window_scores(q, rows, k, key_slots, HEAD_DIM ** -0.5, out=out, **launch))
    flops = 2 * 2 * n_vote * stored * n_q * window * HEAD_DIM  # two QK^T passes
    flops *= batch
    bytes_moved = batch * (n_vote * (n_q * stored * HEAD_DIM * 2 + window * KV_HEADS * HEAD_DIM * 2)
                           + window * (4 + 4 + 4))  # queries, keys, slots, out read+write
    t_bytes = bytes_moved / (ceil["copy_GBps"] * 1e9)
    t_flops = flops / (ceil["matmul_TFLOPs"] * 1e12)
    roof_ms = 1e3 * max(t_bytes, t_flops)
    return {
        "kernel": "scorer", "window": window, "buffer": buffer, "batch": batch,
        "vote_heads": vote_heads, "vote_layers": n_vote, "ms": ms,
        "bytes": bytes_moved, "flops": flops,
        "GBps": bytes_moved / (ms * 1e-3) / 1e9, "TFLOPs": flops / (ms * 1e-3) / 1e12,
        "roofline_ms": roof_ms, "bound": "compute" if t_flops > t_bytes else "memory",
        "fraction_of_roofline": roof_ms / ms, "launch": launch,
    }


def decode_step_roofline_ms(batch: int, context: int, ceil: dict) -> float:
    """Lower bound of an 8B decode step: read the weights and every request's KV once."""
    return 1e3 * (WEIGHT_BYTES + batch * context * KV_BYTES_PER_TOKEN) / (ceil["copy_GBps"] * 1e9)


def bench_compression(window: int, buffer: int, batch: int, page_size: int, ceil: dict) -> dict:
    """One compression event for ``batch`` windows through :class:`Compressor`."""
    cfg = KaraConfig(window=window, buffer=buffer, keep_ratio=0.25)
    policy = make_policy(cfg)
    span = window + buffer
    per_req = -(-(span + page_size) // page_size) * page_size
    num_slots = batch * per_req + page_size
    kb = [torch.randn(num_slots, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
    vb = [torch.randn(num_slots, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
    # Each request owns a contiguous run of slots (page aligned), as a paged allocator gives.
    req_to_token = (page_size + torch.arange(batch, device="cuda")[:, None] * per_req
                    + torch.arange(per_req, device="cuda")[None, :]).to(torch.int32)
    layout = KVLayout(req_to_token, kb, vb, page_size)
    qbuf = QueryBuffer(batch, cfg.resolve_vote_layers(LAYERS), policy.query_ring, Q_HEADS, KV_HEADS,
                       HEAD_DIM, cfg.vote_heads, torch.bfloat16, "cuda")
    qbuf.data.normal_()
    comp = Compressor(policy, layout, qbuf, HEAD_DIM ** -0.5)
    task = CompressionTask(kv_start=0, n_keys=window, keep=cfg.window_budget, n_suffix=buffer, n_queries=span)
    due = [DueRequest(i, i, task) for i in range(batch)]
    saved = req_to_token.clone()

    def run():
        req_to_token.copy_(saved)
        comp.run(due)

    ms = median_ms(run)
    moved_bytes = 0
    if page_size > 1:
        moved_bytes = batch * (cfg.window_budget + buffer) * KV_BYTES_PER_TOKEN * 2  # read + write
    step_ms = decode_step_roofline_ms(batch, PROMPT + span, ceil)
    amortised = ms / window
    del kb, vb, qbuf
    torch.cuda.empty_cache()
    return {
        "kernel": "compression", "window": window, "buffer": buffer, "batch": batch,
        "page_size": page_size, "ms": ms, "moved_bytes": moved_bytes,
        "amortised_ms_per_step": amortised, "decode_step_roofline_ms": step_ms,
        "overhead_fraction": amortised / step_ms,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    ceil = measure_ceilings()
    print(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}, "
          f"triton {triton.__version__}")
    print(f"measured: copy {ceil['copy_GBps']:.0f} GB/s (read+write), bf16 matmul "
          f"{ceil['matmul_TFLOPs']:.0f} TFLOP/s")
    checks = {f"{mode} W={w}": check_scorer(stored, w, 64)
              for mode, stored in (("group", KV_HEADS), ("all", Q_HEADS)) for w in (256, 512, 1024)}
    for name, err in checks.items():
        print(f"check scorer {name}: rel err vs float64 {err:.2e}")
        assert err < 1e-2, name

    sweep = []
    for bq in (64, 128):
        for bk in (64, 128):
            for warps in (4, 8):
                for stages in (2, 3):
                    launch = dict(block_q=bq, block_k=bk, num_warps=warps, num_stages=stages)
                    try:
                        sweep.append(bench_scorer(512, 64, 32, "group", 4, ceil, **launch))
                    except Exception as exc:  # out of shared memory / registers
                        print(f"config {launch} failed: {type(exc).__name__}")
    sweep.sort(key=lambda r: r["ms"])
    print("\nscorer launch sweep (W=512, batch 32, group): best 6")
    for r in sweep[:6]:
        print(f"  {r['launch']}: {r['ms']:.3f} ms, {r['TFLOPs']:.0f} TFLOP/s, "
              f"{100 * r['fraction_of_roofline']:.0f}% of roofline")
    best = sweep[0]["launch"]

    rows = []
    windows = (512,) if args.quick else (256, 512, 1024)
    batches = (1, 32) if args.quick else (1, 8, 32, 64, 128)
    for w in windows:
        for b in batches:
            rows.append(bench_scorer(w, 64, b, "group", 4, ceil, **best))
    for b in batches:
        rows.append(bench_scorer(512, 64, b, "all", 4, ceil, **best))
    print("\n| W | batch | vote heads | ms | GB/s | TFLOP/s | bound | % of roofline |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['window']} | {r['batch']} | {r['vote_heads']} | {r['ms']:.3f} | {r['GBps']:.0f} | "
              f"{r['TFLOPs']:.0f} | {r['bound']} | {100 * r['fraction_of_roofline']:.0f}% |")

    comp_rows = []
    for page in (1, 16):
        for b in batches:
            comp_rows.append(bench_compression(512, 64, b, page, ceil))
    print("\n| page | batch | event ms | per decode step ms (/W) | 8B step roofline ms | overhead |")
    print("|---|---|---|---|---|---|")
    for r in comp_rows:
        print(f"| {r['page_size']} | {r['batch']} | {r['ms']:.3f} | {r['amortised_ms_per_step']:.4f} | "
              f"{r['decode_step_roofline_ms']:.2f} | {100 * r['overhead_fraction']:.2f}% |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": props.name, "ceilings": ceil, "checks": checks, "sweep": sweep,
                       "scorer": rows, "compression": comp_rows}, f, indent=1)


if __name__ == "__main__":
    main()
