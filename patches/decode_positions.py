"""Decode positions: keep RoPE positions absolute after eviction.

Wraps ``sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new`` (AFTER). SGLang
derives a decode token's position from the KV length (``seq_lens - 1``); after ``e`` tokens
were evicted that is ``e`` too small, so each request's evicted count is added (a device
gather, no host sync; CUDA graphs copy ``positions`` in before every replay).
"""

from kara_patches._patch import Patch
from kara_sglang import adapter


def _init_new(forward_batch, cls, batch, *args, **kwargs):
    runtime = adapter.current()
    if runtime is None or forward_batch.positions is None or not forward_batch.forward_mode.is_decode():
        return forward_batch
    offsets = runtime.position_offsets(forward_batch.req_pool_indices)
    if offsets is not None:
        forward_batch.positions = forward_batch.positions + offsets.to(forward_batch.positions.dtype)
    return forward_batch


PATCHES = (Patch("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new", "AFTER", _init_new),)
