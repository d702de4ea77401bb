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
same rows). Everything else (windows, Token2Chunk, the radix-tree prefix, the allocator) does
not depend on the pool kind.
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

    kind: str  # "mha" or "mla"
    num_layers: int
    kv_heads: int
    head_dim: int  # of the keys the scorer reads (MLA: kv_lora_rank + rope)


def kind_of(pool: Any) -> Optional[str]:
    """``"mha"``, ``"mla"``, or ``None`` for a pool Kara does not support.

    Exact classes: subclasses (hybrid SWA, DSA indexer, FP4, page-interleaved, NPU pools) lay
    out or share their rows differently.
    """
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool

    if type(pool) is MHATokenToKVPool:
        return "mha"
    if type(pool) is MLATokenToKVPool:
        return "mla"
    return None


def check_supported(pool: Any, config: KaraConfig) -> None:
    """Raise ``KaraConfigError`` (one line naming the flag) for a pool Kara cannot compress."""
    kind = kind_of(pool)
    if kind is None:
        raise KaraConfigError(
            f"--kv-policy: needs a plain multi-head (MHATokenToKVPool) or MLA (MLATokenToKVPool) KV "
            f"pool; this model uses {type(pool).__name__} (hybrid SWA/mamba, DSA and quantised pools "
            f"are not supported)")
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


def shape_of(pool: Any) -> PoolShape:
    if kind_of(pool) == "mla":
        return PoolShape("mla", len(pool.kv_buffer), 1, pool.kv_lora_rank + pool.qk_rope_head_dim)
    return PoolShape("mha", len(pool.k_buffer), pool.head_num, pool.head_dim)


def key_buffers(pool: Any) -> Sequence[torch.Tensor]:
    """One buffer per layer whose rows are the keys (MLA: the whole latent rows)."""
    return pool.kv_buffer if kind_of(pool) == "mla" else pool.k_buffer


def value_buffers(pool: Any) -> Sequence[torch.Tensor]:
    """One buffer per layer whose rows are the values (MLA: views of the latent rows)."""
    if kind_of(pool) == "mla":
        return [buf[..., : pool.kv_lora_rank] for buf in pool.kv_buffer]
    return pool.v_buffer


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
