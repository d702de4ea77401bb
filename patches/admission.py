"""Admission: reserve for a running request only the KV it can still grow to.

Wraps ``sglang.srt.managers.schedule_policy.PrefillAdder.
_get_running_request_total_token_offset`` (AROUND). SGLang reserves
``min(max_new_tokens - generated, clip) * new_token_ratio`` tokens per running request;
under a policy the request's KV grows by at most ``keep / W`` per decoded token plus one
uncompressed tail, so the reservation is capped there and the freed memory admits more
requests.
"""

from kara_patches._patch import Patch
from kara_sglang import adapter


def _reservation(original, adder, req, *args, **kwargs):
    reserved = original(adder, req, *args, **kwargs)
    runtime = adapter.current()
    if runtime is None:
        return reserved
    return min(reserved, runtime.growth_bound(req))


PATCHES = (Patch("sglang.srt.managers.schedule_policy.PrefillAdder._get_running_request_total_token_offset",
                 "AROUND", _reservation),)
