"""Token2Chunk: turn per-token importance into a keep set of chunks plus single tokens.

The rule, exactly (all of it batched over windows, on the scores' device, no host sync):

1. ``num_chunks = floor(chunk_fraction * budget / gamma)`` seeds: the highest-scoring tokens
   of the window.
2. Each seed grows a contiguous chunk ``[lo, hi]`` one token at a time, ``gamma - 1`` times:
   it takes whichever neighbour (``lo - 1`` or ``hi + 1``) scores higher, the left one on a
   tie, and only the other one at a window edge. So chunks are exactly gamma long (the window
   holds at least gamma tokens because ``gamma <= budget <= W``) and they follow the scores:
   a seed in the middle of an important phrase grows over the phrase, not blindly sideways.
3. Overlapping or touching chunks merge (their union is taken), so a merged run can be longer
   than gamma, and the union never holds more than ``num_chunks * gamma <= budget`` tokens.
4. The rest of the budget goes to the highest-scoring tokens outside the chunks.
5. The keep set is exactly ``budget`` tokens, returned sorted by position.

Where the paper is silent we chose: seeds are the global top tokens (a chunk around a
high-scoring token keeps its local context); fixed gamma growth (the budget is always spent,
so the compression ratio is exact and the KV bytes per request are predictable for the
scheduler); ``chunk_fraction = 0.5`` by default. ``chunk_size = 1`` is plain top-k: the
ablation without Token2Chunk.
"""

from __future__ import annotations

import torch


def topk_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Positions of the ``k`` highest scores of each row, sorted ascending. ``[B, n] -> [B, k]``."""
    return scores.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values


def token2chunk(
    scores: torch.Tensor, budget: int, chunk_size: int, num_chunks: int
) -> torch.Tensor:
    """Keep set of each window.

    Args:
        scores: ``[B, W]`` float importance of each window token; higher is kept first.
        budget: tokens to keep per window, ``1 <= budget <= W``.
        chunk_size: gamma, the length each seed grows to.
        num_chunks: seeds per window; ``num_chunks * chunk_size <= budget``.

    Returns:
        ``[B, budget]`` int64 positions in ``[0, W)``, distinct and ascending per row.
    """
    n_windows, window = scores.shape
    if not 1 <= budget <= window:
        raise ValueError(f"budget {budget} must be in [1, {window}]")
    if num_chunks * chunk_size > budget:
        raise ValueError(f"{num_chunks} chunks of {chunk_size} exceed the budget {budget}")
    scores = scores.float()
    if num_chunks == 0 or chunk_size <= 1:
        return topk_sorted(scores, budget)

    seeds = scores.topk(num_chunks, dim=-1).indices  # [B, S]
    lo, hi = seeds.clone(), seeds.clone()
    neg_inf = torch.full_like(scores[:, :1], float("-inf")).expand(-1, num_chunks)
    for _ in range(chunk_size - 1):
        left, right = lo - 1, hi + 1
        left_score = torch.where(left >= 0, scores.gather(1, left.clamp(min=0)), neg_inf)
        right_score = torch.where(
            right < window, scores.gather(1, right.clamp(max=window - 1)), neg_inf
        )
        take_left = left_score >= right_score
        lo = torch.where(take_left, left, lo)
        hi = torch.where(take_left, hi, right)

    positions = torch.arange(window, device=scores.device)
    in_chunk = ((positions >= lo[..., None]) & (positions <= hi[..., None])).any(dim=1)
    # Chunk tokens rank above every single token; the union holds <= budget tokens.
    ranked = torch.where(in_chunk, torch.full_like(scores, float("inf")), scores)
    return topk_sorted(ranked, budget)
