"""kara-sglang: decode-time KV-cache compression for reasoning-model serving on SGLang.

The core (config, window bookkeeping, policies, Token2Chunk, compressor) needs only torch and
triton; the SGLang adapter and patches are imported only when SGLang loads the plugin.
"""

from kara_sglang.config import KaraConfig, KaraConfigError
from kara_sglang.policies import POLICIES, make_policy
from kara_sglang.window import CompressionTask, WindowState

__version__ = "0.1.0"

__all__ = ["KaraConfig", "KaraConfigError", "POLICIES", "make_policy", "CompressionTask",
           "WindowState", "__version__"]
