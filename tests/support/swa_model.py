"""A tiny random-weight gpt-oss (SGLang's hybrid sliding-window KV pool, ``SWAKVPool``), for tests.

Sliding-window and full-attention layers alternate as in gpt-oss, with learned attention
sinks, a small MoE and YaRN RoPE. On the CPU SGLang serves it with the Triton attention
backend (its kernels on Triton's interpreter; ``torch_native`` handles neither sinks nor
the SWA pool's index translation) and the Triton MoE runner, whose CPU path is SGLang's
native MoE (gpt-oss's default runner, ``triton_kernel``, lays the expert weights out for a
GPU kernel and fails on the CPU).

Small for the interpreter, whose cost grows with the programs launched per step (layers,
heads, KV splits): two sliding-window and two full-attention layers, four query heads on two
KV heads, a small hidden size and MoE, one KV split per decode step (SGLang's default is 8).
On a GPU (``KARA_TEST_DEVICE=cuda``) none of these CPU settings: SGLang's default backends.
"""

from __future__ import annotations

from pathlib import Path

from support.engines import ON_GPU

SLIDING_WINDOW = 4  # HF config; SGLang's sliding_window_size is 3 (gpt-oss counts the token itself)
ENGINE_ARGS = dict(attention_backend="triton", moe_runner_backend="triton", triton_attention_num_kv_splits=1)
if ON_GPU:  # KARA_TEST_DEVICE=cuda: the suite's GPU settings (support.engines), SGLang's own MoE runner
    ENGINE_ARGS = {}


def build_tiny_gpt_oss(folder: Path, seed: int = 0, head_dim: int = 32) -> Path:
    import torch
    from transformers import AutoTokenizer, GptOssConfig, GptOssForCausalLM

    from kara_sglang.demo_model import _save, build_tiny_model

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    tok = AutoTokenizer.from_pretrained(build_tiny_model(folder / "tokenizer_source", seed=seed))
    tok.save_pretrained(folder)
    config = GptOssConfig(
        vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, num_local_experts=2, num_experts_per_tok=1,
        sliding_window=SLIDING_WINDOW, layer_types=["sliding_attention", "full_attention"] * 2,
        max_position_embeddings=8192, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
        pad_token_id=tok.eos_token_id, tie_word_embeddings=False, torch_dtype="bfloat16",
        swiglu_limit=7.0)  # gpt-oss-20b's; transformers 5.12 (SGLang 0.5.17) has no default, SGLang reads it
    torch.manual_seed(seed)
    return _save(folder, GptOssForCausalLM(config))
