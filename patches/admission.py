"""Admission: reserve for a request only the KV it can still grow to under its policy.

SGLang admits a request when the pool can hold its prompt plus ``min(max_new_tokens, clip)``
new tokens, with every running request's own remaining ``max_new_tokens`` (times
``new_token_ratio``) still reserved. Under a policy a request's KV grows by at most
``keep / W`` per decoded token plus one uncompressed tail, so both reservations are capped
there and the memory compression frees admits more requests. Two wraps:

- ``sglang.srt.managers.schedule_policy.PrefillAdder._get_running_request_total_token_offset``
  (AROUND): the running requests' reservations.
- ``sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req`` (AROUND): the new
  request's. SGLang reads ``max_new_tokens`` inline there, so for the duration of the call
  it sees ``generated + growth bound``; the request's real limit is restored before the call
  returns, and nothing of the call's result keeps the lowered value.

A request admitted on this estimate that still runs the pool dry is retracted by SGLang's
own mechanism, exactly as for vanilla's optimistic ``new_token_ratio``.
"""

import math

from kara_patches._patch import Patch
from kara_sglang import adapter


def _reservation(original, adder, req, *args, **kwargs):
    reserved = original(adder, req, *args, **kwargs)
    runtime = adapter.current()
    if runtime is None:
        return reserved
    return min(reserved, runtime.growth_bound(req))


def _add_one_req(original, adder, req, *args, **kwargs):
    runtime = adapter.current()
    if runtime is None:
        return original(adder, req, *args, **kwargs)
    params = req.sampling_params
    limit = params.max_new_tokens
    if limit is None:
        return original(adder, req, *args, **kwargs)
    bounded = len(req.output_ids) + math.ceil(runtime.growth_bound(req))
    if bounded >= limit:
        return original(adder, req, *args, **kwargs)
    params.max_new_tokens = bounded
    try:
        return original(adder, req, *args, **kwargs)
    finally:
        params.max_new_tokens = limit


PATCHES = (
    Patch("sglang.srt.managers.schedule_policy.PrefillAdder._get_running_request_total_token_offset",
          "AROUND", _reservation),
    Patch("sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req", "AROUND", _add_one_req),
)
