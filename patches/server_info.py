"""Server info: the KV pool's accounting and Kara's counters in ``/server_info``.

Wraps ``sglang.srt.managers.scheduler.Scheduler.get_internal_state`` (AFTER): adds
``internal_states[i]["kara"]`` with free, tree-evictable and tree-locked token counts (what
SGLang's idle leak check compares with the pool size), the policy and its settings
(``config``: W, U, keep ratio, budget, γ, scope) and, under a policy, the compression
counters. Applied whatever the policy, so vanilla and Kara servers report the same way.
Under tensor parallelism with ``KARA_DEBUG_CHECKS=1`` it also gathers every rank's digest of
its ``req_to_token`` table and free list (``tp_state_digests``), so tests can see that the
ranks stayed identical.
"""

from kara_patches._patch import Patch
from kara_sglang import adapter
from kara_sglang.dp_rank import dp_rank
from kara_sglang.flags import config_from_attrs
from kara_sglang.tp import digest_state


def session_held_tokens(scheduler) -> int:
    """KV streaming sessions hold between turns: on the tree cache in 0.5.17, on the
    scheduler's pool-stats observer in later releases."""
    for owner in (scheduler.tree_cache, getattr(scheduler, "pool_stats_observer", None)):
        if hasattr(owner, "session_held_tokens"):
            return int(owner.session_held_tokens())
    return 0


def server_config(config) -> dict:
    """The server's own settings (what a results file needs to say what ran)."""
    return {"window": config.window, "buffer": config.buffer, "keep_ratio": config.keep_ratio,
            "budget": config.budget, "chunk_size": config.chunk_size, "scope": config.scope}


def swa_accounting(allocator, tree) -> dict:
    """Hybrid SWA pools: the full pool's free count as ``available_tokens`` (the allocator's own
    is the smaller of both sides) and the SWA side's free, tree-evictable, tree-locked and total
    counts (empty for other pools)."""
    if not (hasattr(allocator, "swa_available_size") and hasattr(allocator, "full_available_size")
            and hasattr(allocator, "size_swa")):
        return {}
    return {"available_tokens": int(allocator.full_available_size()),
            "swa_available_tokens": int(allocator.swa_available_size()),
            "swa_evictable_tokens": int(tree.swa_evictable_size()),
            "swa_protected_tokens": int(tree.swa_protected_size()),
            "swa_max_total_tokens": int(allocator.size_swa)}


def pool_accounting(scheduler) -> dict:
    tree = scheduler.tree_cache
    runtime = adapter.current()
    # The runtime's config is the one in force (on a hybrid SWA pool U may follow the window).
    config = runtime.config if runtime is not None else config_from_attrs(scheduler.server_args)
    info = {
        "max_total_tokens": int(scheduler.max_total_num_tokens),
        "available_tokens": int(scheduler.token_to_kv_pool_allocator.available_size()),
        "evictable_tokens": int(tree.evictable_size()),
        "protected_tokens": int(tree.protected_size()),
        "kv_policy": config.policy,
        "config": server_config(config),
        # --enable-streaming-session: KV a session keeps between its turns, outside the tree
        # (SGLang's own busy/idle check counts it the same way; 0 on other caches).
        "session_held_tokens": session_held_tokens(scheduler),
        # --dp-size N: one entry per replica, each with its own counters.
        "dp_rank": dp_rank(scheduler),
    }
    info.update(swa_accounting(scheduler.token_to_kv_pool_allocator, tree))
    if runtime is not None:
        info.update(runtime.counters())
        if runtime.debug_checks and runtime.tp is not None:
            # Every TP rank answers this request (SGLang broadcasts it), so the gather is
            # matched; rank 0's reply then shows whether the ranks' tables and free lists agree.
            info["tp_state_digests"] = runtime.tp.gather(
                digest_state(runtime.req_to_token_pool.req_to_token, scheduler.token_to_kv_pool_allocator))
    return info


def _internal_state(result, scheduler, *args, **kwargs):
    result.internal_state["kara"] = pool_accounting(scheduler)
    return result


PATCHES = (Patch("sglang.srt.managers.scheduler.Scheduler.get_internal_state", "AFTER", _internal_state),)
