"""Request arrival: refuse bad per-request Kara settings with a clean error.

Wraps ``sglang.srt.managers.scheduler.Scheduler._add_request_to_queue`` (AROUND). A request
whose ``custom_params`` hold an invalid Kara setting is finished with an abort that names
the setting (SGLang's own path for invalid requests), so the server keeps serving. So is one
whose ``input_ids`` hold a token id outside the model's vocabulary, or no token at all (e.g.
``"text": ""`` on a tokenizer without a BOS): SGLang passes them to the model unchecked, and
the embedding's IndexError or an empty prefill's reshape kills the scheduler (a whole server
lost to one bad request; seen on SGLang 0.5.23).
"""

from kara_patches._patch import Patch
from kara_sglang import adapter


def _add_request(original, scheduler, req, *args, **kwargs):
    runtime = adapter.current()
    if runtime is not None and not req.finished():
        try:
            error = runtime.validate_request(req) or bad_input_ids(req, scheduler.model_config.vocab_size)
        except Exception as exc:  # a request the checks did not foresee: its error, not the scheduler's death
            error = f"kara-sglang: cannot read the request: {type(exc).__name__}: {exc}".replace("\n", " ")
        if error is not None:
            req.set_finish_with_abort(error)
    return original(scheduler, req, *args, **kwargs)


def bad_input_ids(req, vocab_size: int):
    """One-line error if the request has no input token (and no embeddings or multimodal
    input standing for them) or an input id outside ``[0, vocab_size)``, else ``None``."""
    ids = req.origin_input_ids
    if not ids:
        if getattr(req, "input_embeds", None) is None and getattr(req, "multimodal_inputs", None) is None:
            return "input_ids: the prompt has no tokens (nothing to prefill)"
        return None
    low, high = min(ids), max(ids)
    if vocab_size <= 0 or (low >= 0 and high < vocab_size):
        return None
    bad = low if low < 0 else high
    return f"input_ids: token id {bad} is outside the model's vocabulary [0, {vocab_size})"


PATCHES = (Patch("sglang.srt.managers.scheduler.Scheduler._add_request_to_queue", "AROUND", _add_request),)
