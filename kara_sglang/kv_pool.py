"""The SGLang KV pools Kara works on, and where each keeps a layer's keys, values and rows.

- ``MHATokenToKVPool``: per layer a K buffer ``[slots, kv_heads, head_dim]`` and a V buffer.
- ``MLATokenToKVPool`` (DeepSeek-V2/V3/R1 and other MLA models): per layer ONE latent buffer
  ``kv_buffer[l]``: ``[slots, 1, kv_lora_rank + qk_rope_head_dim]`` (512 + 64 on DeepSeek-V3),
  the compressed KV followed by the roped key part. SGLang decodes MLA in latent space
  (``models/deepseek_common/attention_forward_methods/forward_mla.py``, ``attn_mqa``): the
  absorbed query ``[q_nope · W_UK, q_rope]`` of every head attends to the latent rows as the
  keys of one KV head, with the first ``kv_lora_rank`` channels of the same rows as values,
  scaled by ``attn_mqa.scaling`` (``1/sqrt(qk_nope + qk_rope)``, times YaRN's mscale²).

So to Kara an MLA layer is one KV head of head dim ``kv_lora_rank + rope`` with every query
head in its group: the scorer reads the latent rows as keys, the query ring stores the
absorbed queries, and compaction moves each latent row once (the value buffer is a view of the
same rows).

- ``SWAKVPool`` (gpt-oss and other hybrid sliding-window models): two MHA pools, one for the
  full-attention layers (``full_kv_pool``, indexed by the row's slots) and one for the
  sliding-window layers (``swa_kv_pool``, indexed by ``full_to_swa_index_mapping[slot]``).
  Kara compresses only the full-attention layers' KV: only they vote, and their buffers are
  the ones it reads, so every layer index Kara keeps is the full pool's own
  (:func:`layer_index`). The sliding-window layers are bounded already: they read the last
  ``sliding_window`` entries of the row, which Kara's uncompressed tail covers (U must be at
  least that window, :func:`check_supported`). A slot's SWA peer goes with it when Kara frees
  it, unless SGLang released that peer already (:func:`free_slots`); the request's SWA
  eviction cursor is kept in step by ``kara_sglang/swa_window.py``.

Everything else (windows, Token2Chunk, the radix-tree prefix) does not depend on the pool kind.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from kara_sglang.config import KaraConfig, KaraConfigError
from kara_sglang.fp8_kv import FP8_DTYPES


@dataclass(frozen=True)
class PoolShape:
    """What the query ring and the scorer need to know of a pool."""

    kind: str  # "mha", "mla" or "swa" (hybrid sliding-window: its full-attention layers)
    num_layers: int  # layers whose keys Kara reads (swa: the full-attention layers)
    kv_heads: int
    head_dim: int  # of the keys the scorer reads (MLA: kv_lora_rank + rope)


def kind_of(pool: Any) -> Optional[str]:
    """``"mha"``, ``"mla"``, ``"swa"``, or ``None`` for a pool Kara does not support.

    Exact classes: subclasses (DSA indexer, FP4, page-interleaved, NPU pools) lay out or
    share their rows differently. ``"swa"``: a ``SWAKVPool`` of two plain MHA pools whose SWA
    side is a paged token pool (not a per-request ring or window rows).
    """
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool

    if type(pool) is MHATokenToKVPool:
        return "mha"
    if type(pool) is MLATokenToKVPool:
        return "mla"
    if _is_plain_swa(pool):
        return "swa"
    return None


def _is_plain_swa(pool: Any) -> bool:
    try:
        from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool
    except ImportError:  # pragma: no cover (a release without the hybrid SWA pool)
        return False
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    return (type(pool) is SWAKVPool and type(pool.full_kv_pool) is MHATokenToKVPool
            and type(pool.swa_kv_pool) is MHATokenToKVPool and pool.full_layer_nums > 0
            and getattr(pool, "swa_req_ring_size", None) is None
            and getattr(pool, "request_window", None) is None
            and not getattr(pool, "swa_uses_full_indices", False))


def check_supported(pool: Any, config: KaraConfig, page_size: int = 1,
                    sliding_window: Optional[int] = None) -> None:
    """Raise ``KaraConfigError`` (one line naming the flag) for a pool Kara cannot compress.

    ``page_size``, ``sliding_window``: the server's (``ModelRunner.sliding_window_size``),
    checked on hybrid SWA pools only."""
    kind = kind_of(pool)
    if kind is None:
        raise KaraConfigError(
            f"--kv-policy: needs a plain multi-head (MHATokenToKVPool), MLA (MLATokenToKVPool) or "
            f"hybrid sliding-window (SWAKVPool of two MHA pools) KV pool; this model uses "
            f"{type(pool).__name__} (mamba, DSA and quantised pools are not supported)")
    if kind == "swa":
        _check_swa(pool, config, page_size, sliding_window)
    device = key_buffers(pool)[0].device
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise KaraConfigError(
            f"--kv-policy: the KV cache is on {device.type}; Kara's Triton kernels run there only "
            f"under Triton's interpreter (set TRITON_INTERPRET=1)")
    # FP8 with cask / longflow is refused from the flags (patches/server_args.py).
    if pool.dtype not in (torch.bfloat16, torch.float16, torch.float32) + FP8_DTYPES:
        raise KaraConfigError(f"--kv-cache-dtype: Kara needs a bf16/fp16/fp8 KV cache, not {pool.dtype}")
    if kind == "mla":
        # Not built yet for MLA: SGLang writes an FP8 latent without a k_scale (and trtllm_mla
        # ropes FP8 queries inside its kernel, after the point where Kara captures them);
        # longflow's kernel and recall read separate K and V heads.
        if pool.dtype in FP8_DTYPES:
            raise KaraConfigError("--kv-cache-dtype: Kara on an MLA KV pool needs a bf16/fp16 cache")
        if config.policy == "longflow":
            raise KaraConfigError("--kv-policy longflow: not supported on an MLA KV pool")
        if config.recall_tokens:
            raise KaraConfigError("--kara-recall-tokens: not supported on an MLA KV pool")


def swa_tail(sliding_window: int) -> int:
    """The least U on a hybrid SWA pool. A decode step's SWA layers read the newest
    ``sliding_window`` entries before its own (window_kv_lens = min(seq_lens,
    sliding_window_size) in SGLang's backends; torch_native masks k >= q - sliding_window_size):
    ``sliding_window + 1`` with the step's own column. Every compressed window is older than the
    tail of U (U + 1 under overlap) entries."""
    return sliding_window + 1


def fit_buffer(pool: Any, config: KaraConfig, sliding_window: Optional[int], buffer_given: bool) -> KaraConfig:
    """The server's config for this pool: on a hybrid sliding-window pool Kara's uncompressed
    tail must cover the sliding window (:func:`swa_tail` entries), so
    with no ``--kara-buffer`` U becomes that (gpt-oss: SGLang's window of 127, so 128) and ``--kv-policy kara`` needs no
    other flag. A U given explicitly is checked by :func:`check_supported`, never changed."""
    if (buffer_given or config.policy != "kara" or kind_of(pool) != "swa"
            or sliding_window is None or sliding_window < 0):
        return config
    need = swa_tail(sliding_window)
    if config.buffer >= need:
        return config
    if need >= config.window:
        raise KaraConfigError(
            f"--kara-window: W={config.window} must exceed the buffer U={need} that covers this "
            f"model's sliding window ({sliding_window} + 1 entries)")
    return config.with_overrides(buffer=need)


def _check_swa(pool: Any, config: KaraConfig, page_size: int, sliding_window: Optional[int]) -> None:
    """What Kara on a hybrid SWA pool is built for (see the module docstring)."""
    from kara_sglang import sglang_versions, swa_window

    lacking = swa_window.missing()
    if lacking is not None:
        raise KaraConfigError(f"--kv-policy: Kara on a hybrid sliding-window KV pool needs SGLang's "
                              f"{lacking}, which SGLang {sglang_versions.installed()} does not have")
    if page_size != 1:
        # Paged compaction copies rows into the slots their new positions own; the SWA
        # layers' rows would have to follow through the full->SWA mapping (not built).
        raise KaraConfigError(f"--page-size: Kara on a hybrid sliding-window KV pool needs page size 1, "
                              f"this server has {page_size}")
    if config.policy != "kara":
        # The others re-compress the newest decode tokens (threshold, streaming, longflow
        # every U steps) or merge rows (cask): not checked against the SWA window yet.
        raise KaraConfigError(f"--kv-policy {config.policy}: only kara is supported on a hybrid "
                              f"sliding-window KV pool")
    if config.recall_tokens:
        raise KaraConfigError("--kara-recall-tokens: not supported on a hybrid sliding-window KV pool")
    if pool.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise KaraConfigError(f"--kv-cache-dtype: Kara on a hybrid sliding-window KV pool needs a "
                              f"bf16/fp16 cache, not {pool.dtype}")
    if sliding_window is None or sliding_window < 0:
        raise KaraConfigError("--kv-policy: this hybrid sliding-window model reports no sliding window size")
    if config.buffer < swa_tail(sliding_window):
        raise KaraConfigError(
            f"--kara-buffer: buffer U={config.buffer} must cover the model's sliding window "
            f"({sliding_window} + 1 = {swa_tail(sliding_window)} entries) on a hybrid sliding-window KV pool")
    for layer in config.vote_layers or ():
        if layer not in pool.layers_mapping:
            raise KaraConfigError(f"--kara-vote-layers: layer {layer} does not exist in a "
                                  f"{pool.layer_num}-layer model")
        if pool.layers_mapping[layer][1]:
            raise KaraConfigError(f"--kara-vote-layers: layer {layer} is a sliding-window layer; only "
                                  f"full-attention layers vote on a hybrid sliding-window KV pool")


def shape_of(pool: Any) -> PoolShape:
    kind = kind_of(pool)
    if kind == "mla":
        return PoolShape("mla", len(pool.kv_buffer), 1, pool.kv_lora_rank + pool.qk_rope_head_dim)
    if kind == "swa":
        full = pool.full_kv_pool
        return PoolShape("swa", len(full.k_buffer), full.head_num, full.head_dim)
    return PoolShape("mha", len(pool.k_buffer), pool.head_num, pool.head_dim)


def layer_index(pool: Any, layer_id: int) -> Optional[int]:
    """Index in :func:`key_buffers` of the model layer ``layer_id``; ``None``: Kara reads none
    of its KV (a sliding-window layer of a hybrid SWA pool)."""
    mapping = getattr(pool, "layers_mapping", None)
    if kind_of(pool) != "swa" or mapping is None:
        return layer_id
    index, is_swa = mapping[layer_id]
    return None if is_swa else index


def vote_layers(pool: Any, config: KaraConfig) -> tuple:
    """The voting layers as indices of :func:`key_buffers` (``--kara-vote-layers`` names model
    layers; on a hybrid SWA pool they must be full-attention layers, checked at start-up)."""
    shape = shape_of(pool)
    if shape.kind != "swa" or config.vote_layers is None:
        return config.resolve_vote_layers(shape.num_layers)
    return tuple(sorted({layer_index(pool, layer) for layer in config.vote_layers}))


def key_buffers(pool: Any) -> Sequence[torch.Tensor]:
    """One buffer per layer whose rows are the keys (MLA: the whole latent rows; hybrid SWA:
    the full-attention layers')."""
    kind = kind_of(pool)
    if kind == "swa":
        return pool.full_kv_pool.k_buffer
    return pool.kv_buffer if kind == "mla" else pool.k_buffer


def value_buffers(pool: Any) -> Sequence[torch.Tensor]:
    """One buffer per layer whose rows are the values (MLA: views of the latent rows)."""
    kind = kind_of(pool)
    if kind == "mla":
        return [buf[..., : pool.kv_lora_rank] for buf in pool.kv_buffer]
    if kind == "swa":
        return pool.full_kv_pool.v_buffer
    return pool.v_buffer


def free_slots(allocator: Any, slots: torch.Tensor) -> None:
    """Give a request's slots back to ``allocator``.

    Hybrid SWA allocator (``SWATokenToKVPoolAllocator``): ``free`` releases each slot's SWA
    peer too, and SGLang treats a slot without one as fatal (``swa.peer_mapped``); a slot whose
    peer SGLang already released (out of the window: mapping 0) goes through ``free_full``
    (which in turn requires the mapping to be 0: ``swa.peer_released``). Each slot is freed
    once, on each side at most once. Page size 1 only (checked at start-up).
    """
    mapping = getattr(allocator, "full_to_swa_index_mapping", None)
    if mapping is None or not hasattr(allocator, "free_full") or slots.numel() == 0:
        allocator.free(slots)
        return
    peered = mapping[slots.to(mapping.device)] > 0
    allocator.free(slots[peered])
    allocator.free_full(slots[~peered])


def values_in_keys(pool: Any) -> bool:
    """True when the value buffers are views of the key rows (moving the keys moves them)."""
    return kind_of(pool) == "mla"


def latent_query(q: torch.Tensor, q_rope: Optional[torch.Tensor], q_heads: int) -> torch.Tensor:
    """A decode step's queries as the scorer reads them against the pool's keys.

    Backends that take the rope part separately (FlashInfer, FA3, FlashMLA, ... call
    ``attn_mqa(q_nope_out, ..., q_rope=q_pe)``) get it appended, in the latent row's order
    (compressed part, then rope); the others already pass the concatenation.
    """
    if q_rope is None:
        return q
    bs = q.shape[0]
    return torch.cat([q.reshape(bs, q_heads, -1), q_rope.reshape(bs, q_heads, -1)], dim=-1)
