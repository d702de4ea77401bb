"""One kernel launch over many per-layer buffers.

SGLang keeps one K (and one V) tensor per layer. Triton's interpreter cannot follow raw
pointers, so instead of a table of data pointers the kernels take the first buffer plus each
buffer's element offset from it: ``buffer_l = base + offsets[l]``. All buffers must share a
dtype; their offsets are cached per buffer list because pools live for the whole server.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import os

import torch

_cache: dict = {}


def buffer_offsets(buffers: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(base, offsets)``: ``offsets[l]`` int64 elements from ``base`` to ``buffers[l]``."""
    base = buffers[0]
    key = (base.dtype, base.device, tuple(b.data_ptr() for b in buffers))
    hit = _cache.get(key)
    if hit is not None:
        return base, hit
    itemsize = base.element_size()
    offsets = []
    for b in buffers:
        if b.dtype != base.dtype or b.device != base.device:
            raise ValueError("all buffers of one launch must share dtype and device")
        delta = b.data_ptr() - base.data_ptr()
        # 16-byte alignment keeps every row access vectorisable.
        if delta % 16:
            raise ValueError("buffers must be 16-byte aligned relative to each other")
        offsets.append(delta // itemsize)
    offsets_t = torch.tensor(offsets, dtype=torch.int64)
    # Pinned and asynchronous: a pageable copy would wait for the stream (the forward step
    # in flight under overlap scheduling); FP8 scoring builds new buffers every compression.
    offsets_t = (offsets_t.pin_memory().to(base.device, non_blocking=True) if base.device.type == "cuda"
                 else offsets_t.to(base.device))
    if len(_cache) > 64:
        _cache.clear()
    _cache[key] = offsets_t
    return base, offsets_t


def row_layout(buffers: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, int, int]:
    """``(base, offsets, stride_slot, row_elems)`` of buffers that share one contiguous row layout.

    The row-moving kernels (compaction, merging) address slot ``s`` of buffer ``l`` as
    ``base + offsets[l] + s * stride_slot``, a row of ``row_elems`` elements.
    """
    base, offsets = buffer_offsets(buffers)
    stride_slot = base.stride(0)
    row_elems = base[0].numel()
    for b in buffers:
        if b.stride(0) != stride_slot or b[0].numel() != row_elems or not b[0].is_contiguous():
            raise ValueError("all buffers must share one contiguous row layout")
    return base, offsets, stride_slot, row_elems


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
