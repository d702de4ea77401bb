"""Streaming output: report KV tokens kept and evicted in each response's ``meta_info``.

Wraps ``sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer.
stream_output`` (BEFORE). SGLang forwards ``req.customized_info[key]`` (one value per output
token) to ``meta_info[key]``; the last value is the final count.
"""

from kara_patches._patch import Patch

KEYS = ("kv_tokens_kept", "kv_tokens_evicted")


def _stream_output(streamer, reqs, *args, **kwargs):
    for req in reqs:
        counts = getattr(req, "kara_kv", None)
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
