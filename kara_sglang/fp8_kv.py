"""FP8 KV caches (``--kv-cache-dtype fp8_e4m3`` / ``fp8_e5m2``): what the scorer reads.

SGLang stores an FP8 cache as bytes (``uint8`` buffers viewed as the float8 type on use), each
key written as ``(k / k_scale).to(float8)`` with the layer's ``k_scale`` (1.0 when the
checkpoint has none). Compaction moves rows of bytes and needs nothing of this; scoring needs
real keys: the window keys are gathered, dequantised (``float8 -> float * k_scale``) into a small
dense buffer in the queries' dtype, and the scorer runs on that buffer unchanged. The gather
reads each window key once more per compression (a window is scored once per W steps).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def dequantized_window_keys(k_buffers: Sequence[torch.Tensor], scales: Sequence[float], slots: torch.Tensor,
                            fp8_dtype: torch.dtype, dtype: torch.dtype) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Dense keys of ``slots`` ([B, n_keys]) from byte-stored FP8 ``k_buffers``, one per layer.

    Returns the per-layer ``[B * n_keys, kv_heads, head_dim]`` buffers in ``dtype`` and the
    ``[B, n_keys]`` slots of the same keys in them (``0 .. B * n_keys - 1``).
    """
    flat = slots.reshape(-1).long()
    dense = [(kb[flat].view(fp8_dtype).to(torch.float32) * scale).to(dtype).contiguous()
             for kb, scale in zip(k_buffers, scales)]
    return dense, torch.arange(flat.numel(), device=slots.device).view(slots.shape)
