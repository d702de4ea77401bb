"""Hybrid SWA pools: SGLang's window eviction on the compacted row.

Wraps ``sglang.srt.managers.schedule_batch.ScheduleBatch._evict_swa`` (AROUND). In a decode
batch SGLang passes the request's length in token space (``req.seqlen - 1``) and releases the
SWA peers of the row's columns more than a window before it; after Kara evicted ``e`` tokens
the row is ``e`` columns shorter, so the frontier is taken back to the row's own
(``kara_sglang/swa_window.py``), or SGLang would release the peers of entries still in the
window. Extend batches pass KV lengths already.
"""

from kara_patches._patch import Patch
from kara_sglang import adapter, swa_window


def _evict_swa(original, batch, req, pre_len, *args, **kwargs):
    if adapter.current() is not None and batch.forward_mode is not None and batch.forward_mode.is_decode():
        pre_len = swa_window.kv_frontier(req, pre_len)
    return original(batch, req, pre_len, *args, **kwargs)


PATCHES = (Patch("sglang.srt.managers.schedule_batch.ScheduleBatch._evict_swa", "AROUND", _evict_swa),)
