"""Request arrival: refuse bad per-request Kara settings with a clean error.

Wraps ``sglang.srt.managers.scheduler.Scheduler._add_request_to_queue`` (AROUND). A request
whose ``custom_params`` hold an invalid Kara setting is finished with an abort that names
the setting (SGLang's own path for invalid requests), so the server keeps serving.
"""

from kara_patches._patch import Patch
from kara_sglang import adapter


def _add_request(original, scheduler, req, *args, **kwargs):
    runtime = adapter.current()
    if runtime is not None and not req.finished():
        error = runtime.validate_request(req)
        if error is not None:
            req.set_finish_with_abort(error)
    return original(scheduler, req, *args, **kwargs)


PATCHES = (Patch("sglang.srt.managers.scheduler.Scheduler._add_request_to_queue", "AROUND", _add_request),)
