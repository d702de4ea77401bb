"""The data-parallel replica a scheduler process serves (``--dp-size N``), per SGLang release.

0.5.17 keeps it on the scheduler (``scheduler.ps.dp_rank``) and on its metrics reporter;
later releases publish it once per process in ``sglang.srt.runtime_context`` and drop both
attributes, so reading the old ones there labels every replica 0. Under DP attention the
replicas share one launch (no controller DP rank); each attention-DP rank is then the replica.
"""

from __future__ import annotations


def dp_rank(scheduler=None) -> int:
    rank = getattr(getattr(scheduler, "ps", None), "dp_rank", None)
    if rank is None:
        try:
            from sglang.srt.runtime_context import get_parallel
        except ImportError:  # 0.5.17: no runtime context; a server without DP has no rank
            return 0
        parallel = get_parallel()
        rank = parallel.dp_rank if parallel.dp_rank is not None else getattr(parallel, "attn_dp_rank", None)
    return int(rank or 0)
