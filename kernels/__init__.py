"""Triton kernels of kara-sglang (installed as ``kara_kernels``: SGLang already depends on a
PyPI package named ``kernels``).

On a machine without a GPU they run under ``TRITON_INTERPRET=1``.
"""

from kara_kernels.compact import compact_kv, compact_kv_reference
from kara_kernels.longflow import (evict_lowest, evict_lowest_reference, longflow_decode,
                                   longflow_decode_reference)
from kara_kernels.merge import merge_kv, merge_kv_reference
from kara_kernels.scorer import window_scores, window_scores_reference

__all__ = ["compact_kv", "compact_kv_reference", "evict_lowest", "evict_lowest_reference",
           "longflow_decode", "longflow_decode_reference", "merge_kv", "merge_kv_reference",
           "window_scores", "window_scores_reference"]
