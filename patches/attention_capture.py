"""Decode forward: capture the queries of the voting layers.

Wraps ``sglang.srt.layers.radix_attention.RadixAttention.forward`` (AROUND). ``q`` arrives
after RoPE, like the cached keys. Only tensor index-puts into static buffers happen here, so
a captured CUDA graph replays them with no host work.
"""

from kara_patches._patch import Patch
from kara_sglang import adapter


def _forward(original, layer, q, k, v, forward_batch, *args, **kwargs):
    runtime = adapter.current()
    if runtime is not None and forward_batch.forward_mode.is_decode():
        runtime.capture(layer, q, forward_batch)
    return original(layer, q, k, v, forward_batch, *args, **kwargs)


PATCHES = (Patch("sglang.srt.layers.radix_attention.RadixAttention.forward", "AROUND", _forward),)
