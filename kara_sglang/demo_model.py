"""A tiny random-weight Qwen2 (or Qwen3) model and a locally trained BPE tokenizer, for CPU demos and tests.

No model hub is reachable here, so tests build their own model folder (seconds) that SGLang
loads like any Hugging Face checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple

WORDS = ("the of and to in is that it for was on are as with his they at be this from have or "
         "by one had not but what all were when we there can an your which their said if do will "
         "each about how up out them then she many some so these would other into has more her two "
         "like him see time could no make than first been its who now people my made over did down "
         "only way find use may water long little very after words called just where most know "
         "zero one two three four five six seven eight nine ten plus minus equals step answer").split()

# A tiny DeepSeek-V2's MLA dimensions: (kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim, v_head_dim).
MLA_TINY = (64, 16, 32, 32)
MLA_DEEPSEEK = (512, 64, 128, 128)  # DeepSeek-V2/V3/R1's own


def build_tiny_model(folder: Path, vocab_size: int = 512, layers: int = 2, seed: int = 0,
                     arch: str = "qwen2", head_dim: int = 32, mla_dims: Tuple[int, int, int, int] = MLA_TINY) -> Path:
    """``arch="qwen3"``: the same shape as Qwen3, whose SGLang model shards attention over the
    attention-TP group, so it runs with DP attention (SGLang's Qwen2 model does not).
    ``arch="deepseek_v2"``: DeepSeek-V2's multi-head latent attention (MLA, SGLang's
    ``MLATokenToKVPool``), see :func:`_deepseek_v2`; ``mla_dims`` = (kv_lora_rank,
    qk_rope_head_dim, qk_nope_head_dim, v_head_dim)."""
    import random

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(40)) for _ in range(2000)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 8, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(folder)

    torch.manual_seed(seed)
    if arch == "deepseek_v2":
        return _save(folder, *_deepseek_v2(vocab_size, layers, fast.eos_token_id, mla_dims))
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[arch]
    config = config_cls(
        vocab_size=vocab_size, hidden_size=4 * head_dim, intermediate_size=8 * head_dim, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        eos_token_id=fast.eos_token_id, bos_token_id=fast.eos_token_id, tie_word_embeddings=False,
        torch_dtype="bfloat16", **({"head_dim": head_dim} if arch == "qwen3" else {}),
    )
    return _save(folder, model_cls(config))


def _deepseek_v2(vocab_size: int, layers: int, eos: int, mla_dims: Tuple[int, int, int, int] = MLA_TINY):
    """A tiny DeepSeek-V2: latent rows of 64 + 16 by default (a head dim that is not a power of
    two, like DeepSeek-V3's 512 + 64; ``MLA_DEEPSEEK`` gives DeepSeek's own, the shapes
    FlashAttention-3's MLA kernels are built for), dense MLPs only (small; SGLang's CPU MoE
    path was not tried), and YaRN RoPE (SGLang's CPU path has no other RoPE for DeepSeek; it
    also scales attention by mscale², so the MLA scale is not 1/sqrt(head dim))."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    kv_lora_rank, rope, nope, v_head_dim = mla_dims
    config = DeepseekV2Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=kv_lora_rank,
        qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=v_head_dim,
        first_k_dense_replace=layers, n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=64,
        num_experts_per_tok=2, max_position_embeddings=8192, eos_token_id=eos, bos_token_id=eos,
        tie_word_embeddings=False, torch_dtype="bfloat16",
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 2048, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 1.0})
    return DeepseekV2ForCausalLM(config), {"moe_layer_freq": 1}  # SGLang reads it; transformers drops it


def _save(folder: Path, model, extra_config: dict = None) -> Path:
    import torch

    model = model.to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():  # larger weights: sharper, token-dependent attention
            p.normal_(0, 0.08)
    model.save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(extra_config or {})
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder
