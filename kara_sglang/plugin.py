"""SGLang plugin entry point (group ``sglang.srt.plugins``, name ``kara``).

SGLang calls :func:`register` in every process that loads plugins. It registers the
always-on patches (flags, start-up); the scheduler start-up patch calls
:func:`apply_runtime_patches` when the server runs a policy. SGLang only logs a hook that
fails to apply, so both check that every patch is really in place and fail loudly if not.
"""

from __future__ import annotations

from typing import Iterable

_runtime_applied = False


def _register(patches: Iterable) -> list:
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    targets = []
    for patch in patches:
        HookRegistry.register(patch.target, patch.hook, HookType[patch.hook_type])
        targets.append(patch.target)
    return targets


def _require_applied(targets: list) -> None:
    from sglang.srt.plugins.hook_registry import HookRegistry

    missing = [t for t in targets if t not in HookRegistry._patched]
    if missing:
        raise RuntimeError(f"kara-sglang: could not patch {missing}; this SGLang version is not supported")


def register() -> None:
    """Called by SGLang's ``load_plugins()``; it applies the hooks right after."""
    import kara_patches
    from kara_patches.server_args import install_engine_keywords

    _register(kara_patches.ALWAYS)
    install_engine_keywords()


def apply_runtime_patches() -> None:
    """Patch the decode path (scheduler process, policy other than ``none``)."""
    global _runtime_applied
    if _runtime_applied:
        return
    import kara_patches
    from sglang.srt.plugins.hook_registry import HookRegistry

    targets = _register(kara_patches.RUNTIME)
    HookRegistry.apply_hooks()
    _require_applied(targets)
    _runtime_applied = True
