"""The recall fill's kernel launch, chosen at start-up on the server's own GPU and shapes.

Each decode step ranks every tier token of every request holding a recall buffer, per layer
(kernels/recall_tier.py ``rank_tier``), and keeps the top R per KV head. Which launch of the
ranking is fastest depends on the GPU, the batch and the row width, and the selection can be
``torch.topk`` or the radix kernel (kernels/select_top.py). So before CUDA graphs are captured
the server times each candidate once on a synthetic tier of its own shapes (random codes, as
many requests as it can run, each holding as many tier tokens as the tier gives it, ranked
over the captured row width) and keeps the fastest. A candidate whose scores or picks differ
from the reference launch's (beyond float32 summation order) is never chosen: a kernel wrong
on this GPU costs speed, not answers. The same start-up times, under the chosen selection, the
two-stage ranking's second stage (``SECOND_STAGE_CANDIDATES``) and the recall buffer's writes
(``WRITE_CANDIDATES``), each kept only if it picks or writes what the first candidate does. On
the CPU nothing is timed: the reference launch.

Engine-independent: shapes in, a :class:`FillLaunch` out.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from kara_kernels.recall import QUANT_GROUP
from kara_kernels.recall_buffer import refresh_recall_buffer
from kara_kernels.recall_pages import PAGE, page_bounds, select_two_stage
from kara_kernels.recall_tier import rank_tier
from kara_kernels.select_top import top_columns

logger = logging.getLogger(__name__)

# The reference (the launch measured in serving) first, then the fastest of
# benchmarks/reasoning/rank_select_bench.py's and tier_layout_bench.py's grids on an H200 at
# the headline's shape (batch 100, 14,336 tier tokens: the reference 1.79 ms per layer, these
# 0.90-1.07).
RANK_CANDIDATES: Tuple[Dict, ...] = (
    {},
    {"low_dot": True, "block_e": 64, "split": 8, "stages": 3, "head_major": True, "bias_codes": True},
    {"low_dot": True, "block_e": 64, "split": 8, "stages": 3, "bias_codes": True},
    {"low_dot": True, "block_e": 64, "split": 8, "stages": 3, "head_major": True},
    {"low_dot": True, "block_e": 64, "split": 8, "stages": 3},
    {"low_dot": True, "block_e": 64, "split": 32, "stages": 2},
)
SELECT_CANDIDATES = ("torch", "radix")
# Two stages (--kara-recall-pages): each stage's selection inside its ranking kernel (two
# launches a layer; radix passes, the default, or the row sorted in registers, which refuses
# rows past its size and is then skipped), or separate ones after each ranking.
TWO_STAGE_SELECT_CANDIDATES = ("fused", "sorted", "radix", "torch")
# Two-stage ranking's second stage (a few pages' tokens per row): the launch measured fastest
# on an H200 at 64 pages kept (benchmarks/reasoning/two_stage_bench.py: 0.119 ms per layer).
SECOND_STAGE_LAUNCH: Dict = {"low_dot": True, "bias_codes": True, "stages": 1}
# Timed at start-up beside it (after the selection is chosen): the in-kernel selection runs the
# second stage as one program per request and KV head, a loop of dependent loads (the chosen
# page, its tier slots, their codes) over the kept pages' tokens; deeper pipelining or wider
# blocks put more of them in flight (the H100 horizon profile: 0.13 ms a layer for ~40 MB).
SECOND_STAGE_CANDIDATES: Tuple[Dict, ...] = (
    SECOND_STAGE_LAUNCH,
    {**SECOND_STAGE_LAUNCH, "stages": 2},
    {**SECOND_STAGE_LAUNCH, "stages": 3},
    {**SECOND_STAGE_LAUNCH, "block_e": 128},
    {**SECOND_STAGE_LAUNCH, "block_e": 128, "stages": 2},
    {**SECOND_STAGE_LAUNCH, "block_e": 128, "num_warps": 8},
)
# The buffer writes (kernels/recall_buffer.py): (picks a program, warps). The first was the
# fastest of recall_step_bench.py's sweep on an H200 before the plan resolved the slots; the
# others fit more programs on an SM (benchmarks/kernel_resources.py: 8 picks on 4 warps, 40
# registers, 12 programs an SM, against 3 for the first).
WRITE_CANDIDATES: Tuple[Tuple[int, int], ...] = ((16, 8), (8, 4), (8, 2), (4, 2), (4, 1), (32, 8))


@dataclass(frozen=True)
class FillLaunch:
    rank: Dict = field(default_factory=dict)  # rank_tier's launch keywords
    select: str = "torch"  # top-R: torch.topk or the radix kernel
    two_stage_select: str = "fused"  # with pages: select_two_stage's ``select``
    second_stage: Optional[Dict] = None  # with pages: the second stage's rank_tier launch; None: SECOND_STAGE_LAUNCH
    writes: Optional[Tuple[int, int]] = None  # the buffer writes' (picks a program, warps); None: the kernel's


def synthetic_tier(batch: int, per_row: int, n_cols: int, q_heads: int, kv_heads: int, head_dim: int, bits: int,
                   dtype: torch.dtype, device: torch.device, seed: int = 0) -> Tuple:
    """Random queries and one layer's K tier (codes, lo, step) with its table, rows and counts:
    ``batch`` requests of ``per_row`` tier tokens each, in tables ``n_cols`` wide (also what
    benchmarks/reasoning/tier_layout_bench.py times)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    slots = batch * per_row
    codes = torch.randint(0, 256, (slots, kv_heads, head_dim * bits // 8), generator=gen, device=device,
                          dtype=torch.uint8)
    groups = head_dim // QUANT_GROUP
    lo = (-torch.rand(slots, kv_heads, groups, generator=gen, device=device) * 2).half()
    step = (torch.rand(slots, kv_heads, groups, generator=gen, device=device) * 0.3 + 0.01).half()
    # A compression stores a window's tokens in consecutive tier slots: rows hold runs of them.
    run = 256
    starts = torch.randperm(-(-slots // run), generator=gen, device=device)[:, None] * run
    order = (starts + torch.arange(run, device=device)).flatten()
    table = torch.zeros(batch, n_cols, dtype=torch.int64, device=device)
    table[:, :per_row] = order[order < slots].view(batch, per_row)
    rows = torch.arange(batch, device=device)
    lens = torch.full((batch,), per_row, dtype=torch.int64, device=device)
    q = torch.randn(batch, q_heads, head_dim, generator=gen, device=device).to(dtype)
    return q, (codes, lo, step), table, rows, lens


def time_ms(step, iters: int) -> float:
    """Milliseconds per call of ``step`` (one warm-up call, then ``iters``, device synchronised)."""
    step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def _same_picks(rank: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same multiset of picked scores (ties may pick different columns)."""
    def picked(sel):
        return rank.gather(-1, sel.clamp(min=0)).masked_fill(sel < 0, float("-inf")).sort(-1).values
    return a.shape == b.shape and torch.equal(picked(a), picked(b))


# At most this many synthetic tier tokens (about 680 MB at 8 KV heads of 128 dims, 4 bits):
# fewer rows beyond it (each keeps its share of the tier: a launch's speed depends on the row's
# length), so the tuning fits beside the pool and the tier.
MAX_SYNTHETIC_TOKENS = 1 << 20


def tuning_shape(rows: int, tier_tokens: int, n_cols: int, horizon: int = 0) -> Tuple[int, int]:
    """(rows, tier tokens a row) to time the fill at. Without a horizon, every row the server
    can run shares the tier. With one, a request's tier fills to the horizon and stays there,
    so the shape a server sized for it runs at is a full tier: tier_tokens // H rows of H
    tokens each (the H100 horizon wave: 77 rows x 4,096, where sharing gave 257 x 1,229 and the
    two stages' fastest selection differs between them). Fewer rows past MAX_SYNTHETIC_TOKENS."""
    if horizon:
        per_row = min(horizon, n_cols, tier_tokens)
        rows = min(rows, max(1, tier_tokens // max(per_row, 1)))
    else:
        per_row = tier_tokens // max(rows, 1)
    per_row = max(1, min(per_row, n_cols, MAX_SYNTHETIC_TOKENS))
    return max(1, min(rows, MAX_SYNTHETIC_TOKENS // per_row)), per_row


def tune_fill_for_server(q_heads: int, kv_heads: int, head_dim: int, bits: int, rows: int, tier_tokens: int,
                         n_cols: int, tokens: int, dtype: torch.dtype, device: torch.device,
                         pages_kept: int = 0, horizon: int = 0) -> FillLaunch:
    """:func:`tune_fill` at a server's shapes (:func:`tuning_shape`), logged; the reference
    launch on the CPU or when the GPU lacks the scratch memory. ``pages_kept`` > 0 (two
    stages): the two-stage selections are timed too."""
    if device.type != "cuda":
        return FillLaunch()
    rows, per_row = tuning_shape(rows, tier_tokens, n_cols, horizon)
    need = rows * per_row * kv_heads * (head_dim * bits // 8 + 4 * head_dim // QUANT_GROUP) + 3 * rows * n_cols * 8
    if pages_kept:  # the synthetic tier's page bounds, float16 max and min
        need += rows * -(-n_cols // PAGE) * kv_heads * head_dim * 4
    need += 6 * rows * tokens * kv_heads * head_dim * 2  # the writes' three K and V buffers (16-bit)
    if 2 * need > torch.cuda.mem_get_info(device)[0]:
        logger.info("kara: recall fill not tuned (%.0f MiB of scratch does not fit): the reference launch",
                    need / 2**20)
        return FillLaunch()
    t0 = time.perf_counter()
    try:
        launch, lines = tune_fill(q_heads, kv_heads, head_dim, bits, rows, per_row, n_cols, tokens, dtype, device,
                                  pages_kept=pages_kept)
    except Exception as exc:  # the tuning can only cost speed: never the server's start
        logger.warning("kara: recall fill tuning failed (%s: %s): the reference launch", type(exc).__name__, exc)
        torch.cuda.empty_cache()
        return FillLaunch()
    try:  # apart: a failure here keeps the fill's tuned launch
        launch = replace(launch, writes=tune_writes(kv_heads, head_dim, bits, rows, per_row, n_cols, tokens, dtype,
                                                    device, lines=lines))
    except Exception as exc:
        logger.warning("kara: recall write tuning failed (%s: %s): the kernel's default", type(exc).__name__, exc)
        torch.cuda.empty_cache()
    for line in lines:
        logger.info("kara: recall fill, %d rows x %d tier tokens over %d columns: %s", rows, per_row, n_cols, line)
    logger.info("kara: recall fill launch %s (tuned in %.1f s)", launch, time.perf_counter() - t0)
    torch.cuda.empty_cache()
    return launch


def tune_fill(q_heads: int, kv_heads: int, head_dim: int, bits: int, batch: int, per_row: int, n_cols: int,
              tokens: int, dtype: torch.dtype, device: torch.device, iters: int = 10,
              rank_candidates: Sequence[Dict] = RANK_CANDIDATES,
              select_candidates: Sequence[str] = SELECT_CANDIDATES, pages_kept: int = 0,
              two_stage_candidates: Sequence[str] = TWO_STAGE_SELECT_CANDIDATES,
              second_stage_candidates: Sequence[Dict] = SECOND_STAGE_CANDIDATES) -> Tuple[FillLaunch, List[str]]:
    """The fastest correct launch at these shapes (module docstring), and one report line per
    candidate (milliseconds per layer, or why it was rejected). ``pages_kept`` > 0: also the
    fastest two-stage selection whose picks agree with the first candidate's, then with it the
    fastest second-stage launch whose picks agree too."""
    per_row = max(1, min(per_row, n_cols))
    q, layer, table, rows, lens = synthetic_tier(batch, per_row, n_cols, q_heads, kv_heads, head_dim, bits, dtype,
                                                 device)
    scale = head_dim ** -0.5
    lines: List[str] = []

    def rank_with(kwargs):
        return rank_tier(q, *layer, table, rows, lens, n_cols, bits, scale, **kwargs)

    reference = rank_with(rank_candidates[0])
    finite = torch.isfinite(reference)
    tolerance = 1e-4 * float(reference[:, :, :per_row].abs().max()) + 1e-5

    def same_scores(got):
        return (torch.equal(got[~finite], reference[~finite])
                and bool(((got - reference).abs()[finite] <= tolerance).all()))

    best_rank = dict(_fastest("rank", rank_candidates, rank_with, same_scores, iters, lines))

    def select_with(select):
        return top_columns(reference, lens, tokens, n_cols, select)

    picks = select_with(select_candidates[0])
    best_select = _fastest("select", select_candidates, select_with,
                           lambda got: _same_picks(reference, got, picks), iters, lines)
    two_stage, second = two_stage_candidates[0], None
    if pages_kept:
        two_stage, second = _tune_two_stage(q, layer, table, rows, lens, n_cols, tokens, bits, scale, pages_kept,
                                            iters, two_stage_candidates, lines, second_stage_candidates)
    return FillLaunch(best_rank, best_select, two_stage, second), lines


def tune_writes(kv_heads: int, head_dim: int, bits: int, batch: int, per_row: int, n_cols: int, tokens: int,
                dtype: torch.dtype, device: torch.device, iters: int = 10,
                candidates: Sequence[Tuple[int, int]] = WRITE_CANDIDATES,
                lines: Optional[List[str]] = None) -> Tuple[int, int]:
    """The buffer writes' fastest launch (picks a program, warps) on a synthetic tier, each call
    writing half of every buffer anew (between the trained model's churn, a third, and dummy
    weights', all); a launch whose buffer differs from the first candidate's is never chosen.
    The first candidate when a row holds fewer than 1.5 x ``tokens`` tier tokens."""
    lines = [] if lines is None else lines
    per_row = max(1, min(per_row, n_cols))
    if per_row < tokens + tokens // 2:
        return candidates[0]
    _, layer, table, rows, lens = synthetic_tier(batch, per_row, n_cols, 1, kv_heads, head_dim, bits, dtype, device)
    tier = (*layer, *layer)  # V as K: the writes' speed depends on the shapes only
    slots = torch.arange(batch * tokens, device=device).view(batch, tokens)
    live = torch.ones(batch, dtype=torch.int32, device=device)
    first = torch.arange(tokens, device=device).expand(batch, kv_heads, tokens).contiguous()
    selections = (first, first + tokens // 2)  # alternate: half of each buffer new a call

    def run(launch, k, v, held, calls, turn=0):
        for i in range(turn, turn + calls):
            refresh_recall_buffer(selections[i % 2], held, table, rows, lens, live, slots, *tier, k, v, bits,
                                  block_w=launch[0], write_warps=launch[1])
        return k, v

    def fresh():
        k = torch.zeros(batch * tokens, kv_heads, head_dim, dtype=dtype, device=device)
        return k, torch.zeros_like(k), torch.full((batch, kv_heads, tokens), -1, dtype=torch.int32, device=device)

    reference = run(candidates[0], *fresh(), 2)
    shared, turns = fresh(), [0]  # every agreeing launch leaves the same buffers: one set serves all timings

    def timed(launch):  # the next selection of the alternation, whichever launch ran the last
        turns[0] += 1
        run(launch, *shared, 1, turns[0])

    def agrees(got):
        return torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1])

    return _fastest("writes, half of each buffer new,", candidates, lambda launch: run(launch, *fresh(), 2), agrees,
                    iters, lines, timed=timed)


def _tune_two_stage(q, layer, table, rows, lens, n_cols, tokens, bits, scale, pages_kept, iters,
                    candidates: Sequence[str], lines: List[str],
                    second_candidates: Sequence[Dict] = SECOND_STAGE_CANDIDATES) -> Tuple[str, Optional[Dict]]:
    """The fastest two-stage selection on the synthetic tier (its page bounds built here)
    whose picks agree with the first candidate's, then the fastest second-stage launch under
    it whose picks agree too (None when the kept pages' tokens all fit: no second ranking);
    a report line for each."""
    n_pages = -(-n_cols // PAGE)
    Hkv, D = layer[0].shape[1], q.shape[2]
    page_table = torch.arange(rows.numel() * n_pages, device=q.device).view(-1, n_pages)
    hi = torch.zeros(page_table.numel(), Hkv, D, dtype=torch.float16, device=q.device)
    lo = torch.zeros_like(hi)
    page_bounds(*layer, table, rows, lens, torch.zeros_like(lens), (lens + PAGE - 1) // PAGE, bits, page_table, hi, lo)
    reference = rank_tier(q, *layer, table, rows, lens, n_cols, bits, scale)

    def run(select, second=SECOND_STAGE_LAUNCH):
        return select_two_stage(q, layer, table, rows, lens, page_table, hi, lo, n_pages, pages_kept, tokens, bits,
                                scale, select, second)

    picks = run(candidates[0])
    select = _fastest(f"two stages, {pages_kept} pages,", candidates, run,
                      lambda got: _same_picks(reference, got, picks), iters, lines)
    if min(pages_kept, n_pages) * PAGE <= tokens or len(second_candidates) < 2:
        return select, None
    second = _fastest(f"second stage under {select},", second_candidates, lambda launch: run(select, launch),
                      lambda got: _same_picks(reference, got, picks), iters, lines)
    return select, second


def _fastest(label: str, candidates: Sequence, run, agrees, iters: int, lines: List[str], timed=None):
    """The candidate whose ``run`` (or ``timed``, when the timed call differs from the checked
    one) is fastest among those whose result ``agrees`` with the reference, and a report line
    for each (milliseconds per layer, or why it was rejected); the first candidate if none
    agrees."""
    best, best_ms = candidates[0], float("inf")
    for candidate in candidates:
        try:
            if not agrees(run(candidate)):
                lines.append(f"{label} {candidate}: rejected, its result differs from the reference's")
                continue
            ms = time_ms(lambda: (timed or run)(candidate), iters)
        except Exception as exc:  # e.g. a launch this GPU's shared memory cannot hold
            lines.append(f"{label} {candidate}: rejected, {type(exc).__name__}: {str(exc)[:100]}")
            continue
        lines.append(f"{label} {candidate}: {ms:.3f} ms/layer")
        if ms < best_ms:
            best, best_ms = candidate, ms
    return best
