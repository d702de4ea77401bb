"""kara-sglang: decode-time KV-cache compression for reasoning-model serving on SGLang.

The core (config, window bookkeeping, policies, Token2Chunk, compressor) needs only torch and
triton; the SGLang adapter and patches are imported only when SGLang loads the plugin. The
names below load on first use, so ``kara_sglang.accuracy`` (an HTTP client, standard library
only) runs where torch is not installed.
"""

from importlib import import_module

__version__ = "0.1.0"

_LAZY = {"KaraConfig": "kara_sglang.config", "KaraConfigError": "kara_sglang.config",
         "POLICIES": "kara_sglang.policies", "make_policy": "kara_sglang.policies",
         "CompressionTask": "kara_sglang.window", "WindowState": "kara_sglang.window"}

__all__ = list(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kara_sglang' has no attribute {name!r}")
