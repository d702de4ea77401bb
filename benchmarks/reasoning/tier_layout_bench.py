"""What the recall tier's ranking costs with other layouts of the tier, on a GPU.

    python benchmarks/reasoning/tier_layout_bench.py [--batch 100] [--evicted 14336] [--row-width 17504]

The ranking reads, per token and KV head, 64 bytes of 4-bit codes and 8 bytes each of float16
lo and step, each from its own tensor (as served). A program of one KV head therefore uses 8
of each 32-byte sector of lo and step. Timed here with the fastest launches of
rank_select_bench.py, at the serving headline's shape:

- ``served``: the three tensors (codes ``[T, Hkv, 64]``, lo and step ``[T, Hkv, 4]``);
- ``record``: one 80-byte record per token and KV head, codes then lo then step, as views of
  one buffer (the kernel only sees other strides): its scores must equal ``served``'s;
- ``record96``: the same padded to 96 bytes (three whole sectors);
- ``2-bit``: 2-bit codes (32 bytes) beside lo and step: what ranking by a 2-bit digest of the
  keys would cost (its scores differ by design).
"""

from __future__ import annotations

import argparse

import torch

from kara_kernels.recall_tier import rank_tier
from kara_sglang.recall_tune import synthetic_tier, time_ms

LAUNCHES = ({"low_dot": True, "block_e": 64, "split": 8, "stages": 3},
            {"low_dot": True, "block_e": 64, "split": 8, "stages": 3, "head_major": True},
            {"low_dot": True, "block_e": 64, "split": 32, "stages": 2},
            {"low_dot": True, "block_e": 64, "split": 8, "stages": 3, "bias_codes": True},
            {"low_dot": True, "block_e": 64, "split": 8, "stages": 3, "head_major": True, "bias_codes": True},
            {"low_dot": True, "block_e": 128, "split": 8, "stages": 3, "head_major": True, "bias_codes": True},
            {"low_dot": True, "block_e": 64, "split": 32, "stages": 2, "bias_codes": True})


def records(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, width: int):
    """``codes``, ``lo`` and ``step`` copied into one ``width``-byte record per token and head."""
    T, H, nb = codes.shape
    ng = lo.shape[-1]
    buf = torch.zeros(T, H, width, dtype=torch.uint8, device=codes.device)
    c, l, s = buf[..., :nb], buf[..., nb:nb + 2 * ng].view(torch.float16), buf[..., nb + 2 * ng:nb + 4 * ng].view(torch.float16)
    c.copy_(codes)
    l.copy_(lo)
    s.copy_(step)
    return c, l, s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--evicted", type=int, default=14336)
    ap.add_argument("--row-width", type=int, default=17504)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: TRITON_INTERPRET=1, a check of the script
    B, E, W, Hkv, D = a.batch, a.evicted, a.row_width, a.kv_heads, a.head_dim
    ng = D // 32
    print(f"batch={B} tier tokens={E} width={W} heads={a.q_heads}/{Hkv} dim={D}", flush=True)
    for bits in (4, 2):
        # Rows hold their tier slots in runs of consecutive slots, as compressions store them.
        q, (codes, lo, step), table, rows, lens = synthetic_tier(B, E, W, a.q_heads, Hkv, D, bits, torch.bfloat16, dev)
        layouts = {"served": (codes, lo, step)}
        if bits == 4:
            layouts["record"] = records(codes, lo, step, D * bits // 8 + 4 * ng)
            layouts["record96"] = records(codes, lo, step, 96)
        per_token = Hkv * (D * bits // 8 + 4 * ng) + 8
        exact = rank_tier(q, codes, lo, step, table, rows, lens, W, bits, 0.125)  # the reference launch
        finite = torch.isfinite(exact)
        for name, layer in layouts.items():
            for launch in LAUNCHES:
                def run():
                    return rank_tier(q, *layer, table, rows, lens, W, bits, 0.125, **launch)
                got = run()
                ref = rank_tier(q, codes, lo, step, table, rows, lens, W, bits, 0.125, **launch)
                same = torch.equal(got, ref)
                err = ((got - exact)[finite].abs().max() / exact[finite].abs().max()).item()
                same_inf = torch.equal(got[~finite], exact[~finite])
                ms = time_ms(run, a.iters)
                print(f"{bits}-bit {name} {launch}: {ms:.3f} ms/layer, {B * E * per_token / ms / 1e6:.0f} GB/s "
                      f"of the bytes it needs, scores equal to the served layout's: {same}, max error vs the "
                      f"reference launch {err:.1e} of the largest score, -inf the same: {same_inf}", flush=True)


if __name__ == "__main__":
    main()
