"""The data-parallel replica a scheduler process serves (``--dp-size N``), per SGLang release.

0.5.17 keeps it on the scheduler (``scheduler.ps.dp_rank``) and on its metrics reporter;
later releases publish it once per process in ``sglang.srt.runtime_context`` and drop both
attributes, so reading the old ones there labels every replica 0. Under DP attention the
replicas share one launch (no controller DP rank); each attention-DP rank is then the replica.
"""

from __future__ import annotations


def dp_rank(scheduler=None) -> int:
    ps = getattr(scheduler, "ps", None)
    if ps is not None:  # 0.5.17 (its runtime context exists but raises on unpublished leaves)
        return int(ps.dp_rank or 0)
    try:
        from sglang.srt.runtime_context import get_parallel

        parallel = get_parallel()
        rank = parallel.dp_rank if parallel.dp_rank is not None else getattr(parallel, "attn_dp_rank", None)
    except (ImportError, AttributeError):  # no runtime context, or no rank published: no DP
        return 0
    return int(rank or 0)
