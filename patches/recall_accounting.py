"""SGLang's busy-time leak check counts the slots recall holds.

Wraps ``SchedulerInvariantChecker._get_total_uncached_sizes`` (AROUND): the check adds the
free, cached and per-request tokens and expects the pool's size. With ``--kara-recall-tokens``
a compressed request's evicted slots stay allocated outside its row (kara_sglang/recall.py),
so they are counted here; at idle nothing is held and SGLang's idle check sees every slot back.
With a tier (``--kara-recall-tier-tokens``) the evicted slots are freed: nothing to add.
"""

from kara_patches._patch import Patch
from kara_sglang import adapter


def _uncached(original, checker, *args, **kwargs):
    full, swa = original(checker, *args, **kwargs)
    runtime = adapter.current()
    if runtime is not None and runtime.holds_evicted_slots:
        full += runtime.recall.held
    return full, swa


PATCHES = (Patch("sglang.srt.managers.scheduler_components.invariant_checker."
                 "SchedulerInvariantChecker._get_total_uncached_sizes", "AROUND", _uncached),)
