"""The recall tier's fill, one stage against two, on a GPU: what each costs per layer.

    python benchmarks/reasoning/two_stage_bench.py [--batch 100] [--evicted 14336] [--row-width 17504]

One stage (the tier today): rank every tier token of a row (the fastest launch measured,
rank_select_bench.py), radix top-R. Two stages (kernels/recall_pages.py): Quest bounds of
16-token pages, the best ``--pages-kept`` pages, then only their tokens ranked, top R, each
selection after its ranking (torch.topk or the radix kernel) or inside it (``fused``). Both are
timed eagerly and replayed from a CUDA graph (as the server runs them), at the serving
headline's shape (Llama-3.1-8B heads, 100 requests of 14,336 4-bit tier tokens, rows 17,504
columns wide). Before timing, the two stages keeping every page must pick what one stage picks.
Also timed: building the page bounds of every row (the server would compute only a
compression's new pages), and the server's whole fill per layer (``recall_fill_tier``: two
stages with the selections in the kernels, then the buffer refreshed) when consecutive steps
pick the same tokens (the same query: nothing to write) and when they share none (independent
queries: every pick written), which brackets the real churn (the probe: about 30% new).
"""

from __future__ import annotations

import argparse

import torch

from kara_kernels.recall_pages import PAGE, page_bounds, rank_pages, select_two_stage
from kara_kernels.recall_tier import rank_tier
from kara_kernels.select_top import select_top
from kara_sglang.recall import recall_fill_tier
from kara_sglang.recall_tier import RecallTier
from kara_sglang.recall_tune import SECOND_STAGE_CANDIDATES, FillLaunch, time_ms

ONE_STAGE = {"low_dot": True, "block_e": 64, "split": 8, "stages": 3, "head_major": True, "bias_codes": True}
SECOND_STAGE = ({}, {"low_dot": True, "bias_codes": True, "stages": 1},
                {"low_dot": True, "bias_codes": True, "stages": 3},
                {"low_dot": True, "bias_codes": True, "stages": 1, "split": 2},
                {"low_dot": True, "bias_codes": True, "stages": 1, "block_e": 32})


def graph_ms(step, iters: int) -> float:
    """Milliseconds per replay of ``step`` captured in a CUDA graph (eager on the CPU)."""
    if not torch.cuda.is_available():
        return time_ms(step, iters)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return time_ms(graph.replay, iters)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--evicted", type=int, default=14336)
    ap.add_argument("--row-width", type=int, default=17504)
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=256, help="R")
    ap.add_argument("--pages-kept", default="64,32,16")
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: TRITON_INTERPRET=1, a check of the script
    gen = torch.Generator(device=dev).manual_seed(0)
    B, E, W, Hkv, D, R = a.batch, a.evicted, a.row_width, a.kv_heads, a.head_dim, a.tokens
    k = torch.randn(B * E + 1, Hkv, D, device=dev, generator=gen, dtype=torch.bfloat16)
    rows = torch.randperm(B, device=dev, generator=gen)
    tier = RecallTier(1, B * E, Hkv, D, D, 4, rows=B, row_capacity=W, device=dev)
    src = (torch.randperm(B * E, device=dev, generator=gen) + 1).view(B, E)
    for w0 in range(0, E, 448):  # a window's evicted tokens at keep 12.5% (W 512)
        w = min(448, E - w0)
        tier.store(rows.tolist(), [w] * B, src[:, w0:w0 + w].reshape(-1), [k], [k])
    lens = torch.full((B,), E, device=dev)
    q = torch.randn(B, a.q_heads, D, device=dev, generator=gen, dtype=torch.bfloat16)
    k_tier, table, scale = tier.layer(0)[:3], tier.rows.slots, D ** -0.5
    n_pages = -(-W // PAGE)
    page_table = torch.arange(B * n_pages, device=dev).view(B, n_pages)
    hi = torch.zeros(B * n_pages, Hkv, D, dtype=torch.float16, device=dev)
    lo = torch.zeros_like(hi)
    zeros = torch.zeros(B, dtype=torch.int64, device=dev)
    pages = (lens + PAGE - 1) // PAGE
    print(f"batch={B} tier tokens={E} width={W} ({n_pages} pages) heads={a.q_heads}/{Hkv} dim={D} R={R}", flush=True)
    ms = time_ms(lambda: page_bounds(*k_tier, table, rows, lens, zeros, pages, 4, page_table, hi, lo), 3)
    print(f"page bounds of every row (once per compression, new pages only): {ms:.3f} ms/layer", flush=True)

    # One stage: the tier's fill today.
    def one_stage():
        rank = rank_tier(q, *k_tier, table, rows, lens, W, 4, scale, **ONE_STAGE)
        return select_top(rank, lens, R, W)

    full = rank_tier(q, *k_tier, table, rows, lens, W, 4, scale, **ONE_STAGE)
    print(f"one stage {ONE_STAGE} + radix: {time_ms(one_stage, a.iters):.3f} ms/layer eager, "
          f"{graph_ms(one_stage, a.iters):.3f} in a graph", flush=True)

    def picked(cols):
        return full.gather(-1, cols.clamp(min=0)).masked_fill(cols < 0, float("-inf")).sort(-1).values

    every = select_two_stage(q, k_tier, table, rows, lens, page_table, hi, lo, n_pages, n_pages, R, 4, scale, "radix", ONE_STAGE)
    ok = torch.equal(picked(every), picked(one_stage()))
    print(f"two stages keeping every page pick what one stage picks: {ok}", flush=True)
    if not ok:
        raise SystemExit("two stages disagree with one: not timed")

    # The pieces, then the whole two-stage fill per setting.
    for block_p, warps in ((32, 4), (64, 8), (64, 4)):
        t = time_ms(lambda: rank_pages(q, page_table, hi, lo, rows, lens, n_pages, scale, block_p=block_p, num_warps=warps), a.iters)
        print(f"rank_pages block_p={block_p} warps={warps}: {t:.3f} ms/layer", flush=True)
    page_rank = rank_pages(q, page_table, hi, lo, rows, lens, n_pages, scale)
    for kept in (int(x) for x in a.pages_kept.split(",")):
        for select in ("torch", "radix"):
            if select == "radix":
                t = time_ms(lambda: select_top(page_rank, pages, kept), a.iters)
            else:
                t = time_ms(lambda: page_rank.topk(kept, dim=-1), a.iters)
            print(f"  {kept} pages ({kept * PAGE} tokens), page selection {select}: {t:.3f} ms/layer", flush=True)
        chosen = select_top(page_rank, pages, kept)
        # The selection alone, radix (five passes over the row) against sorted (the row in
        # registers, bitonic top-k), on the page scores and on the second stage's candidates.
        cand = rank_tier(q, *k_tier, table, rows, lens, kept * PAGE, 4, scale, pages=chosen, page=PAGE,
                         **SECOND_STAGE[1])
        n_cand = torch.full_like(lens, kept * PAGE)
        for what, scores, counts, top in (("page", page_rank, pages, kept), ("token", cand, n_cand, R)):
            same = torch.equal(select_top(scores, counts, top, method="sorted"), select_top(scores, counts, top))
            for method in ("radix", "sorted"):
                t = graph_ms(lambda: select_top(scores, counts, top, method=method), a.iters)
                print(f"  {kept} pages, {what} selection alone ({scores.shape[-1]} columns, top {top}), {method}: "
                      f"{t:.3f} ms/layer in a graph" + ("" if method == "radix" else f"; same picks as radix: {same}"),
                      flush=True)
        for kwargs in SECOND_STAGE:
            try:
                t = time_ms(lambda: rank_tier(q, *k_tier, table, rows, lens, kept * PAGE, 4, scale, pages=chosen,
                                              page=PAGE, **kwargs), a.iters)
                print(f"  {kept} pages, their tokens ranked {kwargs}: {t:.3f} ms/layer", flush=True)
            except Exception as exc:  # a launch this GPU cannot hold
                print(f"  {kept} pages, {kwargs}: failed, {type(exc).__name__}: {str(exc)[:100]}", flush=True)
        for sorted_top in (False, True):
            t = time_ms(lambda: rank_pages(q, page_table, hi, lo, rows, lens, n_pages, scale, top=kept,
                                           sorted_top=sorted_top), a.iters)
            print(f"  {kept} pages, ranked and selected in one kernel{' (sorted)' if sorted_top else ''}: "
                  f"{t:.3f} ms/layer", flush=True)
        for kwargs in SECOND_STAGE_CANDIDATES:  # what a server's start-up times (recall_tune.py)
            try:
                t = graph_ms(lambda: rank_tier(q, *k_tier, table, rows, lens, kept * PAGE, 4, scale, pages=chosen,
                                               page=PAGE, top=R, **kwargs), a.iters)
                print(f"  {kept} pages, their tokens ranked and selected in one kernel {kwargs}: {t:.3f} ms/layer "
                      f"in a graph", flush=True)
            except Exception as exc:  # a launch this GPU cannot hold
                print(f"  {kept} pages, in one kernel {kwargs}: failed, {type(exc).__name__}: {str(exc)[:100]}",
                      flush=True)
        fused = select_two_stage(q, k_tier, table, rows, lens, page_table, hi, lo, n_pages, kept, R, 4, scale, "fused",
                                 SECOND_STAGE[1])
        radix = select_two_stage(q, k_tier, table, rows, lens, page_table, hi, lo, n_pages, kept, R, 4, scale, "radix",
                                 SECOND_STAGE[1])
        ok = torch.equal(picked(fused), picked(radix))
        print(f"  {kept} pages: selections in the kernels pick what the radix kernel picks: {ok}", flush=True)
        ok_sorted = torch.equal(picked(select_two_stage(q, k_tier, table, rows, lens, page_table, hi, lo, n_pages, kept,
                                                         R, 4, scale, "sorted", SECOND_STAGE[1])), picked(radix))
        print(f"  {kept} pages: sorted selections in the kernels pick what the radix kernel picks: {ok_sorted}", flush=True)
        for select in ("torch", "radix", "fused", "sorted"):
            if (select == "fused" and not ok) or (select == "sorted" and not ok_sorted):
                continue
            for kwargs in SECOND_STAGE[1:3]:
                def two():
                    return select_two_stage(q, k_tier, table, rows, lens, page_table, hi, lo, n_pages, kept, R, 4, scale, select,
                                            kwargs)
                print(f"two stages, {kept} pages, {select}, {kwargs}: {time_ms(two, a.iters):.3f} ms/layer eager, "
                      f"{graph_ms(two, a.iters):.3f} in a graph", flush=True)

    # The server's whole fill: two stages, selections in the kernels, the buffer refreshed.
    pool_slots = torch.randperm(B * E, device=dev, generator=gen)[:B * R].view(B, R) + 1
    buffer_slots = torch.zeros(B, R, dtype=torch.int64, device=dev)
    buffer_slots[rows] = pool_slots
    live = torch.ones(B, dtype=torch.int32, device=dev)
    queries = [q, torch.randn_like(q)]
    step_q = q.clone()
    for kept, select in ((int(x), s) for x in a.pages_kept.split(",") for s in ("fused", "sorted")):
        held = torch.full((B, Hkv, R), -1, dtype=torch.int32, device=dev)

        def fill():
            recall_fill_tier(step_q, tier.layer(0), 4, table, rows, lens, live, buffer_slots, held, k, k, scale, W,
                             FillLaunch(two_stage_select=select), (page_table, hi, lo), kept)

        for churn, pattern in (("none", [0]), ("all", [0, 1])):
            turn = [0]

            def step():
                turn[0] += 1
                step_q.copy_(queries[pattern[turn[0] % len(pattern)]])
                fill()

            fill()
            print(f"whole fill, two stages in the kernels ({select}), {kept} pages, buffer refreshed, new picks {churn}: "
                  f"{time_ms(step, a.iters):.3f} ms/layer eager", flush=True)
        if torch.cuda.is_available():
            print(f"whole fill ({select}), {kept} pages, new picks none, in a graph: {graph_ms(fill, a.iters):.3f} ms/layer",
                  flush=True)


if __name__ == "__main__":
    main()
