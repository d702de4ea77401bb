"""Test-only SGLang plugin: MLA models (DeepSeek-V2/V3) on SGLang's CPU ``torch_native`` backend.

SGLang picks a DeepSeek attention layer's forward method per attention backend
(``models/deepseek_common/attention_backend_handler.py``). ``torch_native`` has no handler
there, so it gets the Triton backend's, which runs a prefill without a cached prefix as
plain multi-head attention (``forward_mha``: ``attn_mha`` with ``save_kv_cache=False``).
``torch_native``'s ``forward_extend`` ignores the ``k`` and ``v`` it is handed when not saving
them and reads the cache instead, which holds the latent (kv_lora_rank + rope dims), so the
first prefill fails in ``scaled_dot_product_attention`` (``Expected size for first two
dimensions of batch2 tensor to be: [4, 48] but got: [4, 80]``). With this plugin on
``PYTHONPATH`` every forward of an MLA layer runs SGLang's absorbed MLA path (``attn_mqa`` on
the latent cache), prefill included; that is the path decode takes anyway.
"""


def register() -> None:
    from sglang.srt.models.deepseek_common.attention_backend_handler import (
        AttentionBackendRegistry, _dispatch_mla_subtype)

    AttentionBackendRegistry.register("torch_native", _dispatch_mla_subtype)
