"""Time of the recall emulation's attention (kara_sglang/recall.py) for one decode step.

    python benchmarks/reasoning/recall_step_bench.py [--batch 256] [--resident 700] [--evicted 2300]

Random KV at the ledger model's shapes (SmolLM2-135M: 30 layers, 9 query heads, 3 KV heads,
head dim 64), every row holding ``--resident`` resident and ``--evicted`` evicted tokens; one
line per digest and lag with the milliseconds per layer and per step (all layers). It sizes
the accuracy grid's recall lanes: the emulation runs outside CUDA graphs on every layer of
every step (two Triton launches and a top-k per layer). The ``tier`` lines time the same step
with the evicted tokens in the 4-bit GPU tier (kara_sglang/recall_tier.py: ranked by the
tier's keys, attended dequantised by recall's own kernel), ``tier fill`` what the server runs
instead (rank, top R, the picks written into each row's recall buffer for SGLang's attention),
``quantise`` one compression's move of a window's evicted tokens (384 per row, every row,
every layer) into the tier, and ``buffer write`` the fill's last part: every pick written
(``fill_recall_buffer``) against only the picks a buffer does not hold yet
(``refresh_recall_buffer``, kernels/recall_buffer.py), with consecutive selections sharing all
but ``--churn`` of their picks.
"""

from __future__ import annotations

import argparse
import time

import torch

from kara_kernels.recall_buffer import refresh_recall_buffer
from kara_kernels.recall_tier import fill_recall_buffer, quantize_to_tier, rank_tier
from kara_sglang.recall import recall_attention, recall_attention_tier, recall_fill_tier
from kara_sglang.recall_tier import RecallTier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--resident", type=int, default=700)
    ap.add_argument("--evicted", type=int, default=2300)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--q-heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256, help="R: evicted tokens selected per KV head")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--row-width", type=int, default=0, help="the tier row's width (default evicted + 64)")
    ap.add_argument("--skip-emulation", action="store_true", help="time only the tier's fill and quantise")
    ap.add_argument("--churn", type=float, default=0.3, help="share of a step's picks new (the probe: 0.24-0.36)")
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=dev).manual_seed(0)
    B, L, E = a.batch, a.resident, a.evicted
    slots = B * (L + E) + 1
    k = torch.randn(slots, a.kv_heads, a.head_dim, device=dev, generator=gen, dtype=torch.bfloat16)
    v = torch.randn(slots, a.kv_heads, a.head_dim, device=dev, generator=gen, dtype=torch.bfloat16)
    perm = torch.randperm(slots - 1, device=dev, generator=gen) + 1
    # Tables wider than the rows' counts and rows out of order, as SGLang's req_to_token is.
    rows = torch.randperm(B, device=dev, generator=gen)
    resident = torch.zeros(B, L + 64, dtype=torch.int32, device=dev)
    resident[rows, :L] = perm[:B * L].view(B, L).int()
    evicted = torch.zeros(B, E + 64, dtype=torch.int64, device=dev)
    evicted[rows, :E] = perm[B * L:].view(B, E)
    lens_r = torch.full((B,), L, device=dev)
    lens_e = torch.full((B,), E, device=dev)
    q = torch.randn(B, a.q_heads, a.head_dim, device=dev, generator=gen, dtype=torch.bfloat16)
    prev = torch.randn_like(q)
    def timed(label, step):
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.iters):
            step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        per_layer = (time.perf_counter() - t0) / a.iters * 1e3
        print(f"{label} batch={B} resident={L} evicted={E} R={a.tokens}: "
              f"{per_layer:.2f} ms/layer, {per_layer * a.layers:.0f} ms/step ({a.layers} layers)", flush=True)

    for digest, lag, kv in () if a.skip_emulation else (("exact", 0, "exact"), ("exact", 1, "exact"),
                                                        ("bits2", 0, "exact"), ("bits2", 0, "bits4")):
        select = q if lag == 0 else prev
        timed(f"digest={digest} lag={lag} kv={kv}", lambda: recall_attention(
            q, select, k, v, resident, lens_r, evicted, rows, lens_e, a.tokens, digest, 0.125, n_cols=E, kv=kv))

    # The tier: one layer's tier holding every row's evicted tokens (the step reads one layer).
    width = a.row_width or E + 64
    tier = RecallTier(1, B * E, a.kv_heads, a.head_dim, a.head_dim, 4, rows=B, row_capacity=width, device=dev)
    tier.store(rows.tolist(), [E] * B, evicted[rows, :E].reshape(-1), [k], [v])
    if not a.skip_emulation:
        timed("tier bits4 lag=0 (own attention)", lambda: recall_attention_tier(
            q, q, k, v, resident, lens_r, tier.layer(0), 4, tier.rows.slots, rows, lens_e, a.tokens, 0.125,
            n_cols=E))
    # What the server runs: rank + top-R + write into each row's buffer; SGLang's attention
    # then reads the buffer with the resident tokens (its own cost, not timed here).
    buffers = perm[:B * a.tokens].view(B, a.tokens).long()  # any slots: the values are overwritten
    live = torch.ones(B, dtype=torch.int32, device=dev)
    for label, n_cols in (("longest row", E), (f"row width {width}, as captured", width)):
        timed(f"tier fill ({label})", lambda: recall_fill_tier(
            q, tier.layer(0), 4, tier.rows.slots, rows, lens_e, live, buffers, None, k, v, 0.125, n_cols))
        timed("  of which the ranking", lambda: rank_tier(q, *tier.layer(0)[:3], tier.rows.slots, rows, lens_e,
                                                            n_cols, 4, 0.125))
        rank = torch.randn(B, a.kv_heads, n_cols, device=dev)
        timed(f"  of which top-R over {n_cols} columns", lambda: rank.topk(a.tokens, dim=-1))
    R, n_new = a.tokens, int(a.churn * a.tokens)
    picks = torch.stack([torch.randperm(E, device=dev, generator=gen)[:R + n_new] for _ in range(B * a.kv_heads)])
    picks = picks.view(B, a.kv_heads, R + n_new)
    sel_a, sel_b = picks[..., :R].contiguous(), picks[..., n_new:].contiguous()  # R - n_new shared
    timed("buffer write, every pick", lambda: fill_recall_buffer(
        sel_a, tier.rows.slots, rows, lens_e, live, buffers, *tier.layer(0), k, v, 4))
    held = torch.full((B, a.kv_heads, R), -1, dtype=torch.int32, device=dev)
    flip = [sel_a, sel_b]

    def refresh(**launch):
        flip.reverse()
        refresh_recall_buffer(flip[0], held, tier.rows.slots, rows, lens_e, live, buffers, *tier.layer(0), k, v, 4,
                              **launch)

    timed(f"buffer write, new picks only ({n_new} of {R} a step)", refresh)
    for block_w, warps in ((4, 1), (4, 2), (8, 2), (8, 4), (16, 8), (32, 4), (32, 8), (64, 8)):
        timed(f"  the same, {block_w} picks per program, {warps} warps",
              lambda: refresh(block_w=block_w, write_warps=warps))
    window = min(384, E)
    src, dst = evicted[rows, :window].reshape(-1), torch.arange(B * window, device=dev)
    timed(f"quantise (one compression of {window} tokens per row; ms/layer is per layer)", lambda: quantize_to_tier(
        k, v, src, dst, *tier.layer(0), 4))


if __name__ == "__main__":
    main()
