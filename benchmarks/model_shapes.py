"""Model shapes the serving benchmark loads with SGLang's ``--load-format dummy`` (random
weights, real shapes), one definition for ``bench_serving.py`` (what SGLang loads) and
``arch_bytes_model.py`` (the bytes a decode step reads).

Each shape is the ``config.json`` SGLang reads, as published on Hugging Face (sources next to
each), plus a tiny variant of the same family and features for ``bench_serving.py --cpu-smoke``
(SGLang on a CPU) and the engine settings that variant needs there.

- ``llama-3.1-8b``: Llama-3.1-8B (the README's table).
- ``deepseek-v3-cut``: DeepSeek-V3/R1's dimensions (MLA, 256 routed experts) with the layers
  cut to 4 (3 dense + 1 MoE) and bf16 weights, for one H200 standing in for one GPU of a TP 8
  deployment; why this cut and the pool it runs with: ``arch_bytes_model.py`` and
  docs/throughput.md ("Other architectures: the bytes model"). The multi-token-prediction
  layer is off (``num_nextn_predict_layers`` 0: no speculative decoding, which Kara refuses).
- ``deepseek-v2-lite``: DeepSeek-V2-Lite at its published shape (MLA without a query LoRA,
  64 routed experts).
- ``gpt-oss-20b``: gpt-oss-20b's shape (sliding-window and full-attention layers alternating,
  attention sinks, 32 experts) with bf16 experts: the published checkpoint's MXFP4 experts are
  ``uint8`` blocks and scales, which SGLang's dummy loader leaves uninitialised
  (``initialize_dummy_weights`` fills floating-point parameters only), so the ``mxfp4``
  quantization config is left out. bf16 weights: 41.8 GB, which one H200 holds with room for
  KV.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

TESTS = Path(__file__).resolve().parents[1] / "tests"

# https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}

# https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json (DeepSeek-R1 has the same
# shape), without its fp8 quantization_config (bf16 dummy weights) and its MTP layer.
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 7168,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "num_hidden_layers": 61,
    "num_nextn_predict_layers": 0, "num_attention_heads": 128, "num_key_value_heads": 128,
    "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "n_routed_experts": 256, "n_shared_experts": 1, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "moe_layer_freq": 1, "n_group": 8, "topk_group": 4,
    "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
    "routed_scaling_factor": 2.5, "ep_size": 1, "hidden_act": "silu", "vocab_size": 129280,
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 1,
    "torch_dtype": "bfloat16",
}
# The cut: layers 0-2 dense (first_k_dense_replace), layer 3 MoE (arch_bytes_model.py says why 4).
DEEPSEEK_V3_CUT_LAYERS = 4

# https://huggingface.co/deepseek-ai/DeepSeek-V2-Lite/blob/main/config.json
DEEPSEEK_V2_LITE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "hidden_size": 2048,
    "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 27,
    "num_attention_heads": 16, "num_key_value_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 64,
    "n_shared_experts": 2, "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
    "n_group": 1, "topk_group": 1, "topk_method": "greedy", "scoring_func": "softmax",
    "norm_topk_prob": False, "routed_scaling_factor": 1.0, "hidden_act": "silu", "vocab_size": 102400,
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    "attention_bias": False, "tie_word_embeddings": False, "bos_token_id": 100000,
    "eos_token_id": 100001, "torch_dtype": "bfloat16",
}

# https://huggingface.co/openai/gpt-oss-20b/blob/main/config.json, without its mxfp4
# quantization_config (see the module docstring).
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880,
    "intermediate_size": 2880, "num_hidden_layers": 24, "num_attention_heads": 64,
    "num_key_value_heads": 8, "head_dim": 64, "num_local_experts": 32, "num_experts_per_tok": 4,
    "experts_per_token": 4, "sliding_window": 128,
    "layer_types": ["sliding_attention", "full_attention"] * 12, "attention_bias": True,
    "swiglu_limit": 7.0, "hidden_act": "silu", "vocab_size": 201088, "max_position_embeddings": 131072,
    "initial_context_length": 4096, "rms_norm_eps": 1e-5, "rope_theta": 150000,
    "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False},
    "router_aux_loss_coef": 0.9, "output_router_logits": False, "tie_word_embeddings": False,
    "eos_token_id": 200002, "pad_token_id": 199999, "torch_dtype": "bfloat16",
}


@dataclass
class ModelShape:
    config: dict  # the config.json SGLang loads on a GPU
    cpu_overrides: dict  # what --cpu-smoke shrinks (same family, same special features)
    cpu_engine_args: dict = field(default_factory=dict)  # SGLang settings its CPU path needs
    cpu_plugin: Optional[Path] = None  # a folder spawned schedulers import an SGLang plugin from

    def cpu_config(self) -> dict:
        return {**self.config, **self.cpu_overrides}


# A tiny DeepSeek on a CPU: torch_native attention with the test plugin that sends MLA prefill
# through the absorbed path too (tests/support/mla_cpu: without it the first prefill fails),
# YaRN RoPE as the real configs have (SGLang's CPU path has no other RoPE for DeepSeek).
_TINY_MLA = {"hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64, "num_hidden_layers": 3,
             "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4, "kv_lora_rank": 64,
             "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32, "n_routed_experts": 8}
_MLA_CPU = dict(cpu_engine_args={"attention_backend": "torch_native"}, cpu_plugin=TESTS / "support" / "mla_cpu")

SHAPES = {
    "llama-3.1-8b": ModelShape(
        LLAMA_31_8B, dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=64),
        cpu_engine_args={"attention_backend": "torch_native"}),
    "deepseek-v3-cut": ModelShape(
        {**DEEPSEEK_V3, "num_hidden_layers": DEEPSEEK_V3_CUT_LAYERS},
        {**_TINY_MLA, "q_lora_rank": 64, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1}, **_MLA_CPU),
    "deepseek-v2-lite": ModelShape(DEEPSEEK_V2_LITE, {**_TINY_MLA, "num_experts_per_tok": 2}, **_MLA_CPU),
    # As tests/support/swa_model.py: Triton attention on Triton's interpreter (torch_native has no
    # sinks and misreads the SWA pool), the Triton MoE runner (the default, triton_kernel, fails
    # on a CPU), one KV split per decode step (the interpreter's cost grows with programs launched).
    "gpt-oss-20b": ModelShape(
        GPT_OSS_20B, dict(hidden_size=64, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32, num_local_experts=4, num_experts_per_tok=2,
                          experts_per_token=2, sliding_window=4,
                          layer_types=["sliding_attention", "full_attention"] * 2),
        cpu_engine_args={"attention_backend": "triton", "moe_runner_backend": "triton",
                         "triton_attention_num_kv_splits": 1}),
}
