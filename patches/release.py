"""Request release: the radix tree receives only KV that is still exact.

Wraps ``sglang.srt.mem_cache.common.release_kv_cache`` (AROUND), SGLang's single release
point for finished, aborted and retracted requests. For a compressed request the row is cut
back to its untouched prefix (the prompt) and the compressed tail is freed before SGLang
inserts the row into the tree and frees the rest. A retracted request is re-prefilled with
full KV, so its Kara state is dropped here too.
"""

from kara_patches._patch import Patch
from kara_sglang import adapter


def _release(original, req, tree_cache, *args, **kwargs):
    runtime = adapter.current()
    if runtime is not None:
        runtime.before_release(req, tree_cache.token_to_kv_pool_allocator)
    return original(req, tree_cache, *args, **kwargs)


PATCHES = (Patch("sglang.srt.mem_cache.common.release_kv_cache", "AROUND", _release),)
