"""The recall tier's two per-layer kernels on a GPU: the ranking's launch settings, and the exact
top-R selection against torch.topk, each checked against torch before it is timed.

    python benchmarks/reasoning/rank_select_bench.py [--batch 100] [--evicted 14336] [--row-width 17504]

Defaults: the serving headline's shape (Llama-3.1-8B: 32 query heads, 8 KV heads, head dim
128; 100 requests, 14,336 4-bit tier tokens each, the tier row 17,504 columns wide as CUDA
graphs capture it). One line per setting with milliseconds per layer at the longest row and
at the captured width, and the ranking's effective bandwidth (packed codes + lo/step + table
bytes it must read).
"""

from __future__ import annotations

import argparse
import itertools

import torch

from kara_kernels.recall_tier import rank_tier
from kara_kernels.select_top import select_top
from kara_sglang.recall_tier import RecallTier
from kara_sglang.recall_tune import time_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--evicted", type=int, default=14336)
    ap.add_argument("--row-width", type=int, default=17504)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=256, help="R")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: TRITON_INTERPRET=1, a check of the script
    gen = torch.Generator(device=dev).manual_seed(0)
    B, E, W, Hkv, D = a.batch, a.evicted, a.row_width, a.kv_heads, a.head_dim
    k = torch.randn(B * E + 1, Hkv, D, device=dev, generator=gen, dtype=torch.bfloat16)
    rows = torch.randperm(B, device=dev, generator=gen)
    tier = RecallTier(1, B * E, Hkv, D, D, 4, rows=B, row_capacity=W, device=dev)
    # Rows take their tier slots window by window (384 tokens), interleaved as compressions are.
    src = (torch.randperm(B * E, device=dev, generator=gen) + 1).view(B, E)
    for w0 in range(0, E, 384):
        w = min(384, E - w0)
        tier.store(rows.tolist(), [w] * B, src[:, w0:w0 + w].reshape(-1), [k], [k])
    lens = torch.full((B,), E, device=dev)
    q = torch.randn(B, a.q_heads, D, device=dev, generator=gen, dtype=torch.bfloat16)
    layer = tier.layer(0)[:3]
    table = tier.rows.slots
    print(f"batch={B} tier tokens={E} width={W} heads={a.q_heads}/{Hkv} dim={D} R={a.tokens}", flush=True)

    # Correctness on the GPU: every setting's scores against a torch dequantisation of 3 rows.
    codes, lo, step = layer
    g = a.q_heads // Hkv
    wants = {}
    for b in (0, B // 2, B - 1):
        slots = table[rows[b], :E]
        c = codes[slots].long()
        c = torch.stack((c & 15, c >> 4), -1).reshape(E, Hkv, D).float()
        keys = (c.view(E, Hkv, D // 32, 32) * step[slots].float()[..., None]
                + lo[slots].float()[..., None]).view(E, Hkv, D)
        wants[b] = torch.einsum("ehd,hgd->ehg", keys, q[b].float().view(Hkv, g, D)).amax(-1).T * 0.125

    def error(rank):
        assert all(torch.isinf(rank[b, :, E:]).all() for b in wants)
        return max((rank[b, :, :E] - want).abs().max().item() for b, want in wants.items())

    # What the ranking must read: packed codes, lo and step, and the table.
    bytes_read = B * E * Hkv * (D // 2 + 2 * 2 * (D // 32)) + B * E * 8
    # The block-diagonal product in TF32 (the reference, measured in serving) or in the queries'
    # bf16; one block per program (split None) or a few programs looping over blocks, pipelined
    # or not; programs ordered request first or KV head first. (A kernel multiplying one group
    # of 32 channels at a time, and one ranking every KV head in one program, measured 1.26 and
    # 1.30 ms at best here against 1.01: deleted.)
    settings = [dict()]
    for be, w in ((64, 4), (128, 4)):
        for sp, st in ((None, 1), (2, 3), (8, 3), (32, 2)):
            settings += [dict(block_e=be, num_warps=w, split=sp, stages=st, low_dot=True),
                         dict(block_e=be, num_warps=w, split=sp, stages=st, low_dot=True, head_major=True)]
    rank = None
    for setting in settings:
        def run(n_cols):
            return rank_tier(q, *layer, table, rows, lens, n_cols, 4, 0.125, **setting)
        try:
            err = error(run(W))
            t_long, t_wide = time_ms(lambda: run(E), a.iters), time_ms(lambda: run(W), a.iters)
        except Exception as exc:  # a setting the compiler refuses (shared memory) is reported
            print(f"rank {setting}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            continue
        if rank is None:
            rank = run(W)
        print(f"rank {setting}: {t_long:.3f} ms/layer longest, {t_wide:.3f} captured width, "
              f"{bytes_read / t_long / 1e6:.0f} GB/s, max error vs torch {err:.1e}", flush=True)

    # Selection: the same set as torch.topk (ties aside: compare the picked scores).
    top = rank.topk(a.tokens, dim=-1)
    for block, warps in itertools.product((512, 1024, 2048), (4, 8, 16)):
        sel = select_top(rank, lens, a.tokens, block=block, num_warps=warps)
        same = torch.equal(rank.gather(-1, sel).sort(-1).values, top.values.sort(-1).values)
        t = time_ms(lambda: select_top(rank, lens, a.tokens, block=block, num_warps=warps), a.iters)
        print(f"select_top block={block} warps={warps}: {t:.3f} ms/layer, {t * a.layers:.1f} ms/step, "
              f"same picks as torch.topk {same}", flush=True)
    t = time_ms(lambda: rank.topk(a.tokens, dim=-1), a.iters)
    print(f"torch.topk: {t:.3f} ms/layer, {t * a.layers:.1f} ms/step", flush=True)


if __name__ == "__main__":
    main()
