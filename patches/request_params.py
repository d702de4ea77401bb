"""Request arrival: refuse bad per-request Kara settings with a clean error.

Wraps ``sglang.srt.managers.scheduler.Scheduler._add_request_to_queue`` (AROUND). A request
whose ``custom_params`` hold an invalid Kara setting is finished with an abort that names
the setting (SGLang's own path for invalid requests), so the server keeps serving. So is one
whose ``input_ids`` hold a token id outside the model's vocabulary: SGLang passes them to the
embedding unchecked, and the lookup's IndexError kills the scheduler (a whole server lost to
one bad request, on SGLang 0.5.17 and 0.5.23 alike).
"""

from kara_patches._patch import Patch
from kara_sglang import adapter


def _add_request(original, scheduler, req, *args, **kwargs):
    runtime = adapter.current()
    if runtime is not None and not req.finished():
        error = runtime.validate_request(req) or out_of_vocabulary(req, scheduler.model_config.vocab_size)
        if error is not None:
            req.set_finish_with_abort(error)
    return original(scheduler, req, *args, **kwargs)


def out_of_vocabulary(req, vocab_size: int):
    """One-line error if the request's input ids leave ``[0, vocab_size)``, else ``None``."""
    ids = req.origin_input_ids
    if not ids or vocab_size <= 0:
        return None
    low, high = min(ids), max(ids)
    if low >= 0 and high < vocab_size:
        return None
    bad = low if low < 0 else high
    return f"input_ids: token id {bad} is outside the model's vocabulary [0, {vocab_size})"


PATCHES = (Patch("sglang.srt.managers.scheduler.Scheduler._add_request_to_queue", "AROUND", _add_request),)
