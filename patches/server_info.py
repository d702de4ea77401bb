"""Server info: the KV pool's accounting and Kara's counters in ``/server_info``.

Wraps ``sglang.srt.managers.scheduler.Scheduler.get_internal_state`` (AFTER): adds
``internal_states[i]["kara"]`` with free, tree-evictable and tree-locked token counts (what
SGLang's idle leak check compares with the pool size) and, under a policy, the compression
counters. Applied whatever the policy, so vanilla and Kara servers report the same way.
"""

from kara_patches._patch import Patch
from kara_sglang import adapter


def pool_accounting(scheduler) -> dict:
    tree = scheduler.tree_cache
    info = {
        "max_total_tokens": int(scheduler.max_total_num_tokens),
        "available_tokens": int(scheduler.token_to_kv_pool_allocator.available_size()),
        "evictable_tokens": int(tree.evictable_size()),
        "protected_tokens": int(tree.protected_size()),
        "kv_policy": getattr(scheduler.server_args, "kv_policy", None) or "none",
    }
    runtime = adapter.current()
    if runtime is not None:
        info.update(runtime.counters())
    return info


def _internal_state(result, scheduler, *args, **kwargs):
    result.internal_state["kara"] = pool_accounting(scheduler)
    return result


PATCHES = (Patch("sglang.srt.managers.scheduler.Scheduler.get_internal_state", "AFTER", _internal_state),)
