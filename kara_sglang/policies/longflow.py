"""LongFlow: continuous eviction of the decode cache by the current query's attention alone.

What the paper says (LongFlow, arXiv 2603.11504, "Efficient KV Cache Compression for Reasoning
Models"; its abstract, and the authors' public code read for the details): importance is
estimated from an intermediate result of the attention computation using only the current
query, with negligible overhead and no auxiliary storage (no stored queries, no accumulated
scores), and re-evaluated continuously during long generation. A custom kernel fuses
FlashAttention, the importance estimate and token eviction into one operator. In the authors'
code the importance of cached token ``j`` is the L1 norm of its contribution vector
``p_j v_j`` (``p_j`` its attention probability under the current query, ``v_j`` its value
row), averaged over the layer's query heads (and divided by head_dim); each layer keeps a fixed-size cache of ``budget``
entries, prompt included (the prompt is first cut to the budget by SnapKV), and at every
decode step evicts its argmin token, whose slot the next step's token overwrites.

What runs here:

1. Budget and trigger: ``threshold``'s. ``--kara-budget`` B (required) is the decode cache
   kept; when a request's decode cache reaches ``B + U`` tokens (``--kara-buffer`` U), it is
   cut back to ``B`` by evicting the ``U`` lowest-importance tokens. So the decode cache stays
   in ``[B, B + U)`` exactly as under ``threshold``, and rows of the two compare at matched
   memory. ``U = 1`` is the paper's schedule (one eviction per decode step); a larger U batches
   U one-token evictions into one compaction every U steps, because each compaction rewrites
   the request's ``req_to_token`` row (and, with pages, moves K/V rows) and frees slots through
   SGLang's allocator: work whose per-call cost does not shrink with the number of tokens
   evicted. The default U = 64 amortises it over 64 steps.
2. Candidates: every decode token except the newest U, the ones written since the previous
   eviction (the newest of them is the current step's own token): a single query's attention
   is the only evidence about a token, and these have had the fewest steps to show they are
   used. The prompt is never a candidate (see below). This is ``threshold``'s task shape, so
   the two policies differ only in how importance is estimated.
3. Importance: the query of the step at which the eviction fires (the current step) is the
   only one kept: the query buffer holds one query per voting layer and request, every query
   head of it (``--kara-vote-heads`` does not apply: the real attention needs every head),
   overwritten each step. Importance is the paper's ``p_j * |v_j|_1``, summed over every query
   head of the voting layers (``--kara-vote-layers``; default 4 spread over the model), where
   ``p`` is the softmax of the current query over the request's whole KV, prompt included
   (the distribution the model really attended with). ``kernels/longflow.py`` computes the
   decode attention, ``p`` and the importance in one pass over the KV, read in place by slot;
   a second launch picks the ``U`` lowest candidates on the device (ties: the older token).
4. Eviction: the kept tokens (and the U newest) slide left as for every policy
   (``kernels/compact.py`` with pages), evicted slots go back to SGLang's allocator the same
   step, and RoPE positions of later tokens are offset by the evicted count.

Where we differ from the paper, and why:

- One eviction for all layers. SGLang's pool has one slot per token for every layer (one
  ``req_to_token`` row), so a token is kept or evicted in all layers together; the paper's
  per-layer caches evict different tokens in different layers. Importance is therefore summed
  over the voting layers instead of decided per layer.
- The prompt is never evicted (nor SnapKV-compressed at prefill): prompt slots may be shared
  through SGLang's radix tree with other requests and later turns.
- Separate launch, not a replaced attention operator. The plugin keeps SGLang's attention
  backend (whatever it is: FlashInfer, FA3, Triton), so the importance is recomputed for the
  voting layers only, once per eviction (every U steps), by our kernel with its attention
  output switched off; the paper's operator produces it for free inside every layer's
  attention at every step. The kernel's output path is what would replace the operator; it is
  tested for exactness against SGLang's own Triton decode attention.
- Batched eviction (U tokens every U steps, from the query of the firing step) instead of one
  token per step from each step's query, unless U = 1.
"""

from __future__ import annotations

import torch

from kara_kernels import evict_lowest
from kara_sglang.policies.threshold import ThresholdPolicy


class LongFlowPolicy(ThresholdPolicy):
    """``threshold``'s schedule and task shape (so rows compare at matched budgets); only the
    importance differs."""

    name = "longflow"
    importance = "current_query"

    @property
    def query_ring(self) -> int:
        return 1  # the current step's query only

    @property
    def query_heads(self) -> str:
        return "all"

    def select(self, scores, task, n_windows, device) -> torch.Tensor:
        return evict_lowest(scores, task.n_evicted)
