"""PD decode servers: a retracted request is offloaded and resumed with its Kara state.

Four wraps, all on SGLang's decode-server retraction path (a no-op for requests Kara does not
track yet, and never reached on a server without ``--disaggregation-mode decode``):

- ``sglang.srt.managers.schedule_batch.Req.offload_kv_cache`` (AROUND): copy only the kept KV
  and the row state to the host.
- ``sglang.srt.disaggregation.decode.DecodePreallocQueue._pre_alloc_fill_len`` (AROUND): the
  resumed request's allocation (and the admission budget for it) is the kept length.
- ``sglang.srt.managers.schedule_batch.Req.load_kv_cache`` (AROUND): copy the KV back into
  the new row and move the row state there.
- ``sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_prebuilt`` (AFTER): the
  batch that re-admits it counts its sequence length from its tokens; use its KV length.

See :mod:`kara_sglang.decode_offload`.
"""

from kara_patches._patch import Patch
from kara_sglang import adapter, decode_offload


def _offload(original, req, req_to_token_pool, allocator, *args, **kwargs):
    runtime = adapter.current()
    if runtime is None or not decode_offload.tracked(req):
        return original(req, req_to_token_pool, allocator, *args, **kwargs)
    decode_offload.offload(runtime, req, allocator)
    return None


def _fill_len(original, req, *args, **kwargs):
    return decode_offload.fill_len(req, original(req, *args, **kwargs))


def _load(original, req, req_to_token_pool, allocator, *args, **kwargs):
    runtime = adapter.current()
    if runtime is None or getattr(req, "kara_offloaded", None) is None:
        return original(req, req_to_token_pool, allocator, *args, **kwargs)
    decode_offload.restore(runtime, req, allocator)
    return None


def _prebuilt(result, batch, *args, **kwargs):
    if adapter.current() is not None:
        decode_offload.fix_prebuilt_lengths(batch)
    return result


PATCHES = (
    Patch("sglang.srt.managers.schedule_batch.Req.offload_kv_cache", "AROUND", _offload),
    Patch("sglang.srt.disaggregation.decode.DecodePreallocQueue._pre_alloc_fill_len", "AROUND", _fill_len),
    Patch("sglang.srt.managers.schedule_batch.Req.load_kv_cache", "AROUND", _load),
    Patch("sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_prebuilt", "AFTER", _prebuilt),
)
