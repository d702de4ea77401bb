"""Streaming output: report KV tokens kept and evicted in each response's ``meta_info``.

Wraps ``sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer.
stream_output`` (BEFORE). SGLang forwards ``req.customized_info[key]`` (one value per output
token) to ``meta_info[key]``; the last value is the final count.
"""

from kara_patches._patch import Patch
from kara_sglang.adapter import KaraRuntime

KEYS = ("kv_tokens_kept", "kv_tokens_evicted")


def _stream_output(streamer, reqs, *args, **kwargs):
    for req in reqs:
        # SGLang sends a request's output only when it streams or finishes; filling the
        # per-token lists just then keeps the per-step cost off every other request.
        if not (req.stream or req.finished()):
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
    return None


PATCHES = (Patch("sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer.stream_output",
                 "BEFORE", _stream_output),)
