"""Scheduler start-up: switch the runtime patches on and build the :class:`KaraRuntime`.

Wraps ``sglang.srt.managers.scheduler.Scheduler.__init__`` (BEFORE: when the server runs a
policy, apply the runtime patches before the model runner exists, so CUDA-graph capture
already records the query capture) and ``Scheduler.init_memory_pools`` (AFTER: the KV pool
exists and graphs are not captured yet, so the query buffer is allocated outside any graph;
the tokenizer is loaded by then, which turns the reasoning parser's end-of-thinking marker
into token ids for ``--kara-scope reasoning``).
"""

from __future__ import annotations

from kara_patches._patch import Patch
from kara_sglang import adapter, kv_pool
from kara_sglang.flags import config_from_attrs, given


def _server_args_of(args, kwargs):
    return kwargs.get("server_args", args[1] if len(args) > 1 else None)


def _activate(*args, **kwargs):
    server_args = _server_args_of(args, kwargs)
    if server_args is not None and config_from_attrs(server_args).policy != "none":
        from kara_sglang.plugin import apply_runtime_patches

        apply_runtime_patches()
    return None


def reasoning_end(scheduler, config):
    """The end-of-thinking marker of the server's reasoning parser, as token ids (or None)."""
    name = getattr(scheduler.server_args, "reasoning_parser", None)
    if config.scope == "all" or not name:
        return None
    from sglang.srt.parser.reasoning_parser import ReasoningParser

    from kara_sglang.reasoning import ReasoningEnd

    marker = ReasoningParser.DetectorMap[name.lower()]().think_end_token
    return ReasoningEnd(scheduler.tokenizer.encode(marker, add_special_tokens=False))


def _install(result, scheduler, *args, **kwargs):
    config = config_from_attrs(scheduler.server_args)
    if config.policy != "none":
        runner = scheduler.tp_worker.model_runner
        config = kv_pool.fit_buffer(runner.token_to_kv_pool, config, getattr(runner, "sliding_window_size", None),
                                    buffer_given=given(scheduler.server_args, "kara_buffer"))
        overlap = adapter.OverlapView(scheduler) if scheduler.enable_overlap else None
        adapter.install(config, runner, scheduler.page_size, reasoning_end(scheduler, config), overlap)
    return result


PATCHES = (
    Patch("sglang.srt.managers.scheduler.Scheduler.__init__", "BEFORE", _activate),
    Patch("sglang.srt.managers.scheduler.Scheduler.init_memory_pools", "AFTER", _install),
)
