"""Decode forward: capture the queries of the voting layers; with recall, attend again.

Wraps ``sglang.srt.layers.radix_attention.RadixAttention.forward`` (AROUND). ``q`` arrives
after RoPE, like the cached keys. Only tensor index-puts into static buffers happen here, so
a captured CUDA graph replays them with no host work. With ``--kara-recall-tokens`` (an
emulation, no CUDA graphs) the rows holding evicted KV get the recall attention's output.
"""

from kara_patches._patch import Patch
from kara_sglang import adapter


def _forward(original, layer, q, k, v, forward_batch, *args, **kwargs):
    runtime = adapter.current()
    decode = runtime is not None and forward_batch.forward_mode.is_decode()
    if decode:
        runtime.capture(layer, q, forward_batch, kwargs.get("q_rope"))  # q_rope: MLA, some backends
    out = original(layer, q, k, v, forward_batch, *args, **kwargs)
    if decode and runtime.recall is not None:
        out = runtime.recall_attend(layer, q, out, forward_batch)
    return out


PATCHES = (Patch("sglang.srt.layers.radix_attention.RadixAttention.forward", "AROUND", _forward),)
