"""A running request's KV bookkeeping on SGLang's ``Req``, wherever the release keeps it.

SGLang 0.5.17 keeps ``req_pool_idx``, ``kv_committed_len`` and ``cache_protected_len`` on the
``Req`` and ``kv_allocated_len`` on ``req.kv`` (``None`` while no KV is held); later releases
(seen in 0.5.23) keep all four on ``req.kv``, which is then never ``None``. Everything Kara
reads or writes of them goes through here, so the adapter reads the same on every release.
"""

from __future__ import annotations

from typing import Any, Optional


def _holder(req: Any) -> Any:
    kv = req.kv
    return kv if kv is not None and hasattr(kv, "kv_committed_len") else req


def pool_row(req: Any) -> Optional[int]:
    """The request's ``req_to_token`` row, or ``None`` when it holds no KV (released)."""
    if req.kv is None:
        return None
    return _holder(req).req_pool_idx


def committed_len(req: Any) -> int:
    """KV entries written (SGLang counts a prepared step's slot as soon as it is allocated)."""
    return _holder(req).kv_committed_len


def protected_len(req: Any) -> int:
    """Leading KV entries the radix tree owns (matched or inserted): never touched."""
    return _holder(req).cache_protected_len


def shorten(req: Any, n_removed: int) -> None:
    """Take ``n_removed`` entries off the request's committed and allocated lengths."""
    holder = _holder(req)
    holder.kv_committed_len -= n_removed
    req.kv.kv_allocated_len -= n_removed


def cut_to(req: Any, length: int) -> None:
    """Set the committed and allocated lengths to ``length`` (the row was cut there)."""
    _holder(req).kv_committed_len = length
    req.kv.kv_allocated_len = length
