"""End of a decode step: compress every request whose tail is due.

Wraps ``sglang.srt.managers.scheduler_components.batch_result_processor.
SchedulerBatchResultProcessor.process_batch_result_decode`` (AFTER). By then the step's
tokens are appended, finished requests are released, and the next step's memory check and
allocation have not run, so the slots freed here already admit more work.
"""

from kara_patches._patch import Patch
from kara_sglang import adapter


def _after_decode(result, processor, batch, *args, **kwargs):
    runtime = adapter.current()
    if runtime is not None:
        runtime.after_decode(batch, processor.token_to_kv_pool_allocator)
    return result


PATCHES = (Patch("sglang.srt.managers.scheduler_components.batch_result_processor."
                 "SchedulerBatchResultProcessor.process_batch_result_decode", "AFTER", _after_decode),)
