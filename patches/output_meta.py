"""Streaming output: report KV tokens kept and evicted in each response's ``meta_info``.

Wraps ``sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer.
stream_output`` (BEFORE). SGLang forwards ``req.customized_info[key]`` (one value per output
token) to ``meta_info[key]``; the last value is the final count. With ``KARA_TRACK_KEPT``
(kara_sglang/kept_positions.py) a finished request also gets ``kv_kept_per_block``.
"""

from kara_patches._patch import Patch
from kara_sglang.adapter import KaraRuntime

KEYS = ("kv_tokens_kept", "kv_tokens_evicted")


def _stream_output(streamer, reqs, *args, **kwargs):
    from sglang.srt.managers.scheduler_components.output_streamer import DEFAULT_FORCE_STREAM_INTERVAL

    for req in reqs:
        # SGLang sends a request's output when it streams, finishes, or (not streaming) every
        # DEFAULT_FORCE_STREAM_INTERVAL tokens, forwarding only the values from the last send
        # on; filling the per-token lists just then keeps the per-step cost off the others.
        if not (req.stream or req.finished() or len(req.output_ids) % DEFAULT_FORCE_STREAM_INTERVAL == 0):
            continue
        counts = KaraRuntime.kv_counts(req)
        if counts is None:
            continue
        info = req.customized_info
        if info is None:
            info = req.customized_info = {}
        n = len(req.output_ids)
        for key, value in zip(KEYS, counts):
            values = info.setdefault(key, [])
            values.extend([value] * (n - len(values)))
        blocks = getattr(req, "kara_kept_blocks", None)  # KARA_TRACK_KEPT: at the last token only
        if blocks is not None and req.finished():
            values = info.setdefault("kv_kept_per_block", [])
            values.extend([None] * (n - 1 - len(values)) + [blocks])
    return None


PATCHES = (Patch("sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer.stream_output",
                 "BEFORE", _stream_output),)
