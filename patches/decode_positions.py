"""Positions: keep RoPE positions absolute after eviction.

Wraps ``sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new`` (AFTER). SGLang
derives a decode token's position from the KV length (``seq_lens - 1``); after ``e`` tokens
were evicted that is ``e`` too small, so each request's evicted count is added (a device
gather, no host sync; CUDA graphs copy ``positions`` in before every replay). An extend batch
holding a continued session turn (its prompt in KV space, ``kara_sglang.session_continue``)
gets each token's position from the turn's history instead.
"""

from kara_patches._patch import Patch
from kara_sglang import adapter


def _init_new(forward_batch, cls, batch, *args, **kwargs):
    runtime = adapter.current()
    if runtime is None or forward_batch.positions is None:
        return forward_batch
    mode = forward_batch.forward_mode
    if mode.is_decode():
        offsets = runtime.position_offsets(forward_batch.req_pool_indices)
        if offsets is not None:
            forward_batch.positions = forward_batch.positions + offsets.to(forward_batch.positions.dtype)
    elif mode.is_extend() and getattr(forward_batch, "extend_seq_lens_cpu", None) is not None:
        positions = runtime.extend_positions(batch.reqs, forward_batch.extend_prefix_lens_cpu,
                                             forward_batch.extend_seq_lens_cpu)
        if positions is not None:
            forward_batch.positions = positions.to(forward_batch.positions.device, forward_batch.positions.dtype)
    return forward_batch


PATCHES = (Patch("sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new", "AFTER", _init_new),)
