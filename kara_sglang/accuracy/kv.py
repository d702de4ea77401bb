"""How much decode KV a request kept, from the plugin's per-output-token counts.

A kara-sglang server puts ``meta_info["kv_tokens_kept"]`` and ``["kv_tokens_evicted"]`` in each
``/generate`` response: value i is what the request held (prompt included) and had evicted
after output token i. Per request:

- decode KV held at output i: ``kept_i - prompt_tokens``
- uncompressed decode KV at output i: ``kept_i + evicted_i - prompt_tokens``. This is the
  ``i + 1`` tokens decoded so far, but counted at the same moment as ``kept_i`` (the newest
  token's KV is written one step after it is sampled, and a non-streamed response fills its
  lists every few tokens), so a request that evicted nothing reads exactly 1.0
- ``fraction`` = sum_i held / sum_i uncompressed: the share of decode KV kept, averaged over
  the generation (what bounds concurrency), not only its end
- ``mean_tokens`` = mean_i held

Without the lists (a server without the plugin) there is nothing to measure: ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class RequestKV:
    fraction: float
    mean_tokens: float
    final_kept: int  # decode KV held after the last output token
    final_evicted: int


def request_kv(meta_info: Mapping[str, Any]) -> Optional[RequestKV]:
    kept = meta_info.get("kv_tokens_kept")
    evicted = meta_info.get("kv_tokens_evicted")
    prompt = meta_info.get("prompt_tokens")
    if not kept or not isinstance(kept, list) or prompt is None:
        return None
    if not isinstance(evicted, list) or len(evicted) != len(kept):
        evicted = [0] * len(kept)
    held = [k - prompt for k in kept]
    uncompressed = [k + e - prompt for k, e in zip(kept, evicted)]
    total = sum(uncompressed)
    return RequestKV(
        fraction=sum(held) / total if total > 0 else 1.0,  # nothing decoded: nothing to compress
        mean_tokens=sum(held) / len(held),
        final_kept=held[-1],
        final_evicted=evicted[-1],
    )
