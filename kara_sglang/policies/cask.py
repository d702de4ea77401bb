"""CASK: a protected core kept exactly, the redundant scratch merged, on Kara's windows.

What the paper says (CASK, arXiv 2026, "Core-Aware Selective KV Compression for Reasoning
Traces"; only its abstract is available): the decode-time reasoning trace is partitioned into
a protected *core*, which anchors answer formation and intermediate state, and mergeable
*scratch* with high redundancy; the core is preserved, and selective consolidation (merging
redundant KV, not just evicting it) is applied only to the scratch. It also describes a
two-stage mode that evicts prefix (prompt) KV. How the core is found, how scratch is grouped,
how merged entries are weighted and placed, and when compression runs are not in the abstract:
everything below past the core/scratch split is our choice.

What runs here, exactly (per window, batched over windows, on the scores' device):

1. Trigger and region: Kara's. When a request's uncompressed decode tail holds ``W + U``
   tokens, its oldest ``W`` are scored by all ``W + U`` tail queries with the bidirectional
   scorer (``kernels/scorer.py``); the newest ``U`` stay and open the next window. The window
   shrinks to ``budget`` entries and is final afterwards; the prompt is never touched.
2. Core: the ``C = round(core_fraction * budget)`` highest-scoring window tokens
   (``--kara-core-fraction``, default 0.5). They are kept bit-exactly.
3. Scratch: the other ``N = W - C`` tokens, in position order, are cut into
   ``S = budget - C`` runs of consecutive (non-core) positions of near-equal length
   (``ceil`` / ``floor`` of ``N / S``: run ``g`` is non-core tokens ``ceil(g N / S)`` up to
   ``ceil((g + 1) N / S)``). A run may straddle core tokens; they stay separate, exact entries.
4. Each run becomes ONE entry: its K row is the score-weighted average of the run's K rows and
   its V row the score-weighted average of its V rows (weights = the tokens' bidirectional
   scores normalised over the run, uniform if they sum to 0), in every layer and head,
   accumulated in float32 (``kernels/merge.py``, one launch for all layers). It is written
   into the slot of the run's highest-scoring token (its *representative*); the run's other
   slots are freed. So each window keeps exactly ``budget`` entries: ``C`` exact + ``S``
   merged, and frees ``W - budget`` slots (reported as ``kv_tokens_evicted``).
5. ``core_fraction = 1`` keeps plain top-``budget`` tokens (no merging: Kara with gamma = 1);
   ``core_fraction = 0`` merges the whole window into ``budget`` runs.

Why runs of consecutive positions, not key-similarity clusters: a reasoning trace's
redundancy is mostly local (a step restated, a sum carried over a few tokens), and a run is
where merging is safest under RoPE: its keys were rotated at nearby positions, so their phases
differ little, and the span of one run is bounded (about ``W / S`` positions). Runs also give
an exact entry count with no data-dependent shapes (no host sync, the scheduler's
KV-per-request bound stays exact) and need no extra pass over K. Similarity clustering would
let one cluster mix keys rotated far apart, whose average attends like neither.

RoPE and positions: SGLang stores keys already rotated, so the merged key is an average of
keys rotated at the run's positions; it is not re-rotated (the true pre-rotation keys are not
kept). The merged entry takes the KV index of its representative in the compacted window
(entries stay in position order), and like every kept token it keeps the rotation it was
stored with; the position offset of later tokens is Kara's (``evicted`` grows by
``W - budget``), so new tokens' positions are unchanged. Attention to a merged entry is thus
an approximation whose error grows with the run's positional span and its keys' spread.

Left out: the paper's prefix (prompt) eviction. Prompt KV slots may be shared through
SGLang's radix tree with other requests and later turns, so evicting or rewriting them for one
request would corrupt the others; like every policy here, CASK only rewrites the request's own
decode tail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from kara_sglang.policies.kara import KaraPolicy
from kara_sglang.token2chunk import topk_sorted


@dataclass(frozen=True)
class MergePlan:
    """Merged entries of ``n`` windows, as positions within each window.

    Attributes:
        targets: ``[n, S]`` position whose slot receives each merged entry (in the keep set).
        members: ``[n, S, G]`` positions merged into each entry; the first ``sizes[g]`` are
            real, the rest repeat the target.
        weights: ``[n, S, G]`` float32, summing to 1 over the real members (0 on padding).
        sizes: ``[S]`` int32 real members of each entry (the same for every window).
    """

    targets: torch.Tensor
    members: torch.Tensor
    weights: torch.Tensor
    sizes: torch.Tensor


class CaskPolicy(KaraPolicy):
    name = "cask"

    @property
    def core_size(self) -> int:
        budget = self.config.window_budget
        return min(budget, max(0, int(round(self.config.core_fraction * budget))))

    def select(self, scores, task, n_windows, device) -> torch.Tensor:
        return self.select_and_merge(scores, task, n_windows, device)[0]

    def select_and_merge(self, scores: torch.Tensor, task, n_windows: int,
                         device) -> Tuple[torch.Tensor, Optional[MergePlan]]:
        """Keep set ``[n, keep]`` (ascending) and the merges that fill its scratch entries."""
        scores = scores.float()
        n, window = scores.shape
        budget = task.keep
        core_n = min(self.core_size, budget)
        n_runs = budget - core_n
        if n_runs == 0:
            return topk_sorted(scores, budget), None
        is_core = torch.zeros_like(scores, dtype=torch.bool)
        if core_n:
            core = scores.topk(core_n, dim=-1, sorted=False).indices
            is_core.scatter_(1, core, True)
        else:
            core = torch.empty(n, 0, dtype=torch.int64, device=scores.device)
        n_scratch = window - core_n
        # Stable sort puts the non-core positions first, in position order.
        scratch = is_core.to(torch.int8).argsort(dim=1, stable=True)[:, :n_scratch]  # [n, N]
        g = torch.arange(n_runs + 1, device=scores.device)
        starts = -(-g * n_scratch // n_runs)  # ceil(g N / S)
        sizes = starts[1:] - starts[:-1]  # [S], each >= 1 since S <= N
        longest = -(-n_scratch // n_runs)
        offset = torch.arange(longest, device=scores.device)
        real = offset[None, :] < sizes[:, None]  # [S, G]
        index = (starts[:-1, None] + offset[None, :]).clamp(max=n_scratch - 1)
        members = scratch[:, index.reshape(-1)].reshape(n, n_runs, longest)
        member_scores = scores.gather(1, members.reshape(n, -1)).reshape(n, n_runs, longest)
        best = member_scores.masked_fill(~real, float("-inf")).argmax(dim=-1, keepdim=True)
        targets = members.gather(2, best).squeeze(2)  # [n, S]
        w = member_scores.clamp(min=0) * real
        total = w.sum(dim=-1, keepdim=True)
        uniform = real.float() / sizes[:, None].float()
        weights = torch.where(total > 0, w / total.clamp(min=torch.finfo(torch.float32).tiny),
                              uniform.expand_as(w))
        members = torch.where(real, members, targets[..., None])
        keep = torch.cat([core, targets], dim=1).sort(dim=1).values
        return keep, MergePlan(targets, members, weights, sizes.to(torch.int32))
