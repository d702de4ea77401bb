"""Decode forward: capture the queries of the voting layers; with recall, attend again.

Wraps ``sglang.srt.layers.radix_attention.RadixAttention.forward`` (AROUND). ``q`` arrives
after RoPE, like the cached keys. Only tensor index-puts into static buffers happen here, so
a captured CUDA graph replays them with no host work. With a recall tier
(``--kara-recall-tier-tokens``) each request's recall buffer is filled before SGLang's
attention runs (graph-capturable too); the recall emulation (no tier, no CUDA graphs) replaces
the output of the rows holding evicted slots after it.
"""

from kara_patches._patch import Patch
from kara_sglang import adapter


def _forward(original, layer, q, k, v, forward_batch, *args, **kwargs):
    runtime = adapter.current()
    decode = runtime is not None and forward_batch.forward_mode.is_decode()
    if decode:
        runtime.capture(layer, q, forward_batch, kwargs.get("q_rope"))  # q_rope: MLA, some backends
        if runtime.tier is not None:
            runtime.recall_fill(layer, q, forward_batch)
    out = original(layer, q, k, v, forward_batch, *args, **kwargs)
    if decode and runtime.holds_evicted_slots:
        out = runtime.recall_attend(layer, q, out, forward_batch)
    elif decode and runtime.tier is not None and runtime.debug_checks and not q.is_cuda:
        runtime.check_recall_output(layer, q, out, forward_batch)
    return out


PATCHES = (Patch("sglang.srt.layers.radix_attention.RadixAttention.forward", "AROUND", _forward),)
