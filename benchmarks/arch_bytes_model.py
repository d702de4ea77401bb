"""docs/throughput.md's bytes model per architecture: what Kara should gain on MLA, MoE and
hybrid sliding-window models, before a GPU measures it.

    python benchmarks/arch_bytes_model.py                 # 1024 + 16384 tokens, H200
    python benchmarks/arch_bytes_model.py --device "NVIDIA H100 80GB HBM3"   # the same on an H100
    python benchmarks/arch_bytes_model.py --counts gpt-oss-20b   # pool and requests, for arch.sh

A decode step reads the weights it touches and the KV of every running request once, at the
GPU's copy bandwidth (H200 4.3 TB/s, H100 3.0 TB/s); throughput = running requests / step time.

- **Weights.** Dense layers, attention, shared experts, routers, norms, the LM head and the
  input embedding (counted whole, as ``report_throughput.py``'s 16.06 GB for Llama-3.1-8B
  does) every step; of each MoE layer's E routed experts, those the batch's B tokens route to:
  under uniform routing of k experts a token, E x (1 - (1 - k/E)^B) distinct experts.
- **KV** per request and token held: MHA/GQA 2 x KV heads x head dim x layers x 2 bytes; MLA
  its latent row, (kv_lora_rank + qk_rope_head_dim) x layers x 2 bytes; hybrid sliding-window
  models the full-attention layers' tokens plus min(window, tokens) on each sliding layer.
  Kara compresses the full-attention / MLA KV only; a request's average over its life comes
  from Kara's own window bookkeeping (``report_throughput.kv_profile``).
- **Concurrency**: each configuration at its own pool limit, pool tokens / the KV a request
  may reach (prompt + output for vanilla; for Kara the prompt + the growth bound its admission
  reserves, ``policy.max_growth``: 5,696 tokens at 25%, 3,648 at 12.5%; as ``headline.sh``
  offers them, so no request is retracted), at most 255 (``bench_serving.py``'s
  ``--max-running-requests`` 256 ran 255 at once). The pool: what SGLang's
  ``--mem-fraction-static 0.85`` left the Llama-3.1-8B headline runs for weights and KV (H200:
  845,617 tokens of 128 KiB + 16.06 GB; H100: 423,494 tokens), minus the model's weights, over its bytes per
  pool token (hybrid pools: a full-layer token plus 0.8 of a sliding-layer token, SGLang's
  default ``--swa-full-tokens-ratio``).

**DeepSeek-V3 on one H200.** The model ships fp8 weights (about 671 GB; MTP layer off), so one
GPU of a TP 8 deployment holds about 84 GB of them and a replica of every request's latent KV
(MLA's latent row is not split over TP ranks): 61 x (512 + 64) x 2 = 70,272 bytes a token.
``deepseek-v3-cut`` runs DeepSeek-V3's real dimensions with bf16 dummy weights and fewer
layers on one H200, its pool pinned (``--max-total-tokens``) to the TP 8 rank's pool in tokens,
so each configuration runs the rank's concurrency and its MoE layers see the rank's batch (the
share of experts a step touches). The ratio of KV bytes to weight bytes a step reads cannot
match the rank's by the layer cut: per layer, the KV a step reads is the same on both, while
the cut reads each layer's weights whole in bf16 where the rank reads an eighth in fp8, 16x
the bytes; cutting layers scales KV and weights alike. Only dense layers (0-2, much smaller
than an MoE layer) and the LM head move the ratio, so the fewest layers that keep an MoE layer,
4 (3 dense + 1 MoE), come closest; more layers lower the KV share further (``--cut-layers``
prints each cut's share). Matching the ratio through the pool instead would need a pool 6 to
11 times the rank's (``--cut-layers``: the vanilla requests each cut needs), whose concurrency
passes the request cap before Kara's is reached. So the cut measures Kara on DeepSeek-V3's MLA
and MoE kernels at the rank's concurrency with a smaller KV share than the rank's; this model
predicts both, and the cut's measured gain against its prediction says how far the rank's
prediction can be trusted.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model_shapes import DEEPSEEK_V3, SHAPES  # noqa: E402
from report_throughput import (BANDWIDTH_BY_DEVICE, DEFAULT_POOL_TOKENS, KV_BYTES_PER_TOKEN,  # noqa: E402
                               WEIGHT_BYTES, kv_profile)


@dataclass(frozen=True)
class Device:
    """What the model needs of a GPU: its copy bandwidth, and the bytes SGLang's
    --mem-fraction-static 0.85 left for weights + KV pool there (Llama-3.1-8B headline runs)."""
    name: str
    bandwidth: float
    static_bytes: float


H200 = Device("NVIDIA H200", BANDWIDTH_BY_DEVICE["NVIDIA H200"], 845_617 * KV_BYTES_PER_TOKEN + WEIGHT_BYTES)
H100 = Device("NVIDIA H100 80GB HBM3", BANDWIDTH_BY_DEVICE["NVIDIA H100 80GB HBM3"],
              DEFAULT_POOL_TOKENS * KV_BYTES_PER_TOKEN + WEIGHT_BYTES)
DEVICES = {d.name: d for d in (H200, H100)}
# bench_serving.py's --max-running-requests is 256, of which SGLang ran 255 at once on the H200
# (the headline FP8 waves: a 256th request waited and ran alone at the end), so offer 255.
MAX_RUNNING_REQUESTS = 255
SWA_FULL_TOKENS_RATIO = 0.8  # SGLang's default: sliding-layer pool tokens per full-layer token
BF16, FP8 = 2, 1
WINDOW, BUFFER = 512, 64  # Kara's W and U; hybrid sliding-window pools need U >= the window


@dataclass
class Weights:
    """Parameter counts a step reads: ``always`` every step, ``expert`` per routed expert of each
    of ``moe_layers`` layers (``experts`` each, ``active`` a token)."""
    always: float
    expert: float = 0
    moe_layers: int = 0
    experts: int = 1
    active: int = 1

    def params_per_step(self, batch: float) -> float:
        touched = self.experts * (1 - (1 - self.active / self.experts) ** batch)
        return self.always + self.moe_layers * touched * self.expert

    def total(self) -> float:
        return self.always + self.moe_layers * self.experts * self.expert


def count_weights(config: dict, tp: int = 1) -> Weights:
    """Parameters of a Llama, DeepSeek-V2/V3 or gpt-oss config; with ``tp`` > 1, one rank's: SGLang
    splits heads, MLPs and experts' intermediate dimension, the vocabulary and the LM head over
    the ranks and replicates the rest (MLA's down-projections, norms, routers)."""
    c, h, layers = config, config["hidden_size"], config["num_hidden_layers"]
    vocab = 2 * c["vocab_size"] * h / tp  # input embedding and LM head
    if c["model_type"] in ("deepseek_v2", "deepseek_v3"):
        heads, nope, rope, v = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
        q_rank = c["q_lora_rank"]  # V3: q through a low-rank latent (its down-projection and norm); V2-Lite: none
        q_down, q_up = (h * q_rank + q_rank, q_rank * heads * (nope + rope)) if q_rank else (0, h * heads * (nope + rope))
        replicated = q_down + h * (c["kv_lora_rank"] + rope) + c["kv_lora_rank"] + 2 * h
        split = q_up + c["kv_lora_rank"] * heads * (nope + v) + heads * v * h
        attention = replicated + split / tp
        dense = c["first_k_dense_replace"]
        moe_layers, experts = layers - dense, c["n_routed_experts"]
        expert = 3 * h * c["moe_intermediate_size"] / tp
        per_moe_layer = h * experts + experts + c["n_shared_experts"] * expert  # router, its bias, shared
        always = layers * attention + dense * 3 * h * c["intermediate_size"] / tp + moe_layers * per_moe_layer
        return Weights(always + vocab + h, expert, moe_layers, experts, c["num_experts_per_tok"])
    heads, kv_heads = c["num_attention_heads"], c["num_key_value_heads"]
    d = c.get("head_dim") or h // heads
    if c["model_type"] == "gpt_oss":  # biases on q, k, v, o and the experts; a sink logit per head
        attention = (h + 1) * (heads + 2 * kv_heads) * d + (heads * d + 1) * h + heads + 2 * h
        inter, experts = c["intermediate_size"], c["num_local_experts"]
        expert = (h * 2 * inter + 2 * inter + inter * h + h) / tp
        always = layers * (attention + (h + 1) * experts) + vocab + h
        return Weights(always, expert, layers, experts, c["num_experts_per_tok"])
    attention = h * (heads + 2 * kv_heads) * d + heads * d * h + 2 * h
    return Weights(layers * (attention + 3 * h * c["intermediate_size"]) + vocab + h)


@dataclass
class KVShape:
    """Bytes a request's KV takes per token: ``full`` on the layers Kara compresses (MHA/GQA's K
    and V, MLA's latent row), ``sliding`` on sliding-window layers (at most ``window`` tokens)."""
    full: int
    sliding: int = 0
    window: int = 0

    def pool_bytes_per_token(self) -> float:
        return self.full + SWA_FULL_TOKENS_RATIO * self.sliding


def kv_shape(config: dict, dtype_bytes: int = BF16) -> KVShape:
    c, layers = config, config["num_hidden_layers"]
    if "kv_lora_rank" in c:
        return KVShape((c["kv_lora_rank"] + c["qk_rope_head_dim"]) * layers * dtype_bytes)
    per_layer = 2 * c["num_key_value_heads"] * (c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]) \
        * dtype_bytes
    sliding = sum(t == "sliding_attention" for t in c.get("layer_types", []))
    return KVShape(per_layer * (layers - sliding), per_layer * sliding, c.get("sliding_window", 0))


@dataclass
class Arch:
    name: str
    config: dict
    weight_bytes: int = BF16  # per parameter
    tp: int = 1
    pool_tokens: int = 0  # 0: what the device holds after the weights
    buffer: int = BUFFER
    device: Device = H200

    def weights(self) -> Weights:
        return count_weights(self.config, self.tp)

    def kv(self) -> KVShape:
        return kv_shape(self.config)

    def pool(self) -> int:
        if self.pool_tokens:
            return self.pool_tokens
        free = self.device.static_bytes - self.weights().total() * self.weight_bytes
        return int(free // self.kv().pool_bytes_per_token())


def sliding_average(kv: KVShape, prompt: int, output: int) -> float:
    """Average tokens a sliding-window layer holds for a request over its decode."""
    return sum(min(kv.window, prompt + t) for t in range(1, output + 1)) / output if kv.sliding else 0


@dataclass
class Step:
    running: int
    weight_bytes: float
    kv_bytes: float
    bandwidth: float

    @property
    def seconds(self) -> float:
        return (self.weight_bytes + self.kv_bytes) / self.bandwidth

    @property
    def tok_per_s(self) -> float:
        return self.running / self.seconds

    @property
    def kv_share(self) -> float:
        return self.kv_bytes / (self.weight_bytes + self.kv_bytes)


def admitted_tokens(prompt: int, output: int, keep=None, buffer: int = BUFFER) -> int:
    """KV tokens SGLang reserves for a request at admission: vanilla its whole length; Kara the
    prompt and its policy's growth bound (``adapter.growth_bound`` for a new request)."""
    if keep is None:
        return prompt + output
    from kara_sglang import KaraConfig, WindowState, make_policy

    policy = make_policy(KaraConfig(policy="kara", window=WINDOW, buffer=buffer, keep_ratio=keep))
    return prompt + policy.max_growth(WindowState(prompt_len=0), output)


@functools.lru_cache(maxsize=None)  # one window simulation per policy and lengths (a second each)
def average_kv(prompt: int, output: int, keep=None, buffer: int = BUFFER) -> float:
    """KV tokens a request holds on average over its decode (vanilla: prompt + output / 2)."""
    policy = "vanilla" if keep is None else "kara"
    return kv_profile(policy, prompt, output, keep, window=WINDOW, buffer=buffer)[0]


def step(arch: Arch, prompt: int, output: int, keep=None, running=None) -> Step:
    """The average decode step of a wave of ``running`` requests (default: the pool limit) under
    vanilla (``keep`` None) or Kara keeping ``keep`` of each window."""
    avg = average_kv(prompt, output, keep, arch.buffer)
    if running is None:
        running = min(arch.pool() // admitted_tokens(prompt, output, keep, arch.buffer), MAX_RUNNING_REQUESTS)
    kv = arch.kv()
    per_request = avg * kv.full + sliding_average(kv, prompt, output) * kv.sliding
    return Step(running, arch.weights().params_per_step(running) * arch.weight_bytes, running * per_request,
                arch.device.bandwidth)


def rank_pool_tokens(tp: int = 8) -> int:
    """Pool tokens of one H200 of a TP ``tp`` DeepSeek-V3 deployment with fp8 weights (an H100's
    80 GB do not hold a TP 8 rank's 84 GB of weights)."""
    return Arch("rank", DEEPSEEK_V3, FP8, tp).pool()


def architectures(device: Device = H200) -> list:
    """The shapes on ``device``: its bandwidth for every step; its memory for the pools, except
    the DeepSeek-V3 rank and its cut, which keep the H200 deployment's pool."""
    gpt_oss = SHAPES["gpt-oss-20b"].config
    return [
        Arch("llama-3.1-8b", SHAPES["llama-3.1-8b"].config, device=device),
        # Every weight at 1 byte: the checkpoint's bf16 embedding, LM head, norms and routers are
        # under 0.5% of a rank's parameters.
        Arch("deepseek-v3 TP8 rank (fp8)", DEEPSEEK_V3, FP8, tp=8),
        Arch("deepseek-v3-cut", SHAPES["deepseek-v3-cut"].config, pool_tokens=rank_pool_tokens(), device=device),
        Arch("deepseek-v2-lite", SHAPES["deepseek-v2-lite"].config, device=device),
        # U must cover the sliding window (docs/design.md, hybrid sliding-window models).
        Arch("gpt-oss-20b", gpt_oss, buffer=gpt_oss["sliding_window"], device=device),
    ]


def device_named(name: str) -> Device:
    """A device by the name nvidia-smi or torch gives it; refuses one the model has no numbers for."""
    if name not in DEVICES:
        raise SystemExit(f"arch_bytes_model.py: no bandwidth and pool for {name!r}; known: {', '.join(DEVICES)}")
    return DEVICES[name]


CONFIGS = (("vanilla", None), ("kara 25%", 0.25), ("kara 12.5%", 0.125))


def print_table(prompt: int, output: int, device: Device = H200) -> None:
    print(f"{prompt} + {output} tokens, each configuration at its own pool limit (pool / admitted KV, at most "
          f"{MAX_RUNNING_REQUESTS}), {device.name} at {device.bandwidth / 1e12:.1f} TB/s "
          f"(the DeepSeek-V3 rank: an H200's)")
    print(f"| architecture | KV bytes/token | pool tokens | configuration | running | weights GB/step | KV GB/step "
          f"| weights / KV share | step ms | tok/s | vs vanilla |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for arch in architectures(device):
        kv, base = arch.kv(), None
        kv_text = f"{kv.full:,}" + (f" + {kv.sliding:,} (window {kv.window})" if kv.sliding else "")
        for name, keep in CONFIGS:
            s = step(arch, prompt, output, keep)
            base = base or s
            print(f"| {arch.name} | {kv_text} | {arch.pool():,} | {name} | {s.running} | {s.weight_bytes / 1e9:.1f} | "
                  f"{s.kv_bytes / 1e9:.1f} | {1 - s.kv_share:.0%} / {s.kv_share:.0%} | {1e3 * s.seconds:.1f} | "
                  f"{s.tok_per_s:,.0f} | {s.tok_per_s / base.tok_per_s:.2f}x |")


def print_cut_layers(prompt: int, output: int) -> None:
    """Vanilla's KV share of a step for DeepSeek-V3 cuts of 4 to 8 layers at the TP 8 rank's
    pool, against the rank's, and the pool each cut would need to match the rank's share."""
    rank = step(Arch("rank", DEEPSEEK_V3, FP8, tp=8), prompt, output)
    print(f"TP 8 rank: pool {rank_pool_tokens():,} tokens, vanilla {rank.running} requests, KV share {rank.kv_share:.0%}")
    for layers in range(4, 9):
        cut = Arch("cut", {**DEEPSEEK_V3, "num_hidden_layers": layers}, pool_tokens=rank_pool_tokens())
        s = step(cut, prompt, output, running=rank.running)
        # KV grows with the pool (running requests) and so does the share; solve for the rank's.
        need = rank.kv_share / (1 - rank.kv_share) * s.weight_bytes / (s.kv_bytes / rank.running)
        weights_gb = cut.weights().total() * BF16 / 1e9
        print(f"cut to {layers} layers: {weights_gb:.0f} GB of bf16 weights, KV share {s.kv_share:.0%} at "
              f"{rank.running} requests; the rank's share needs more than {need:.0f} vanilla requests")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--output", type=int, default=16384)
    ap.add_argument("--counts", metavar="SHAPE", help="print 'POOL VANILLA KARA25 KARA125' for a shape (arch.sh)")
    ap.add_argument("--pool", type=int, default=0, help="with --counts: this pool instead of the model's")
    ap.add_argument("--cut-layers", action="store_true", help="the DeepSeek-V3 layer cut's KV share by layers")
    ap.add_argument("--device", default=H200.name, help=f"the GPU, as nvidia-smi names it ({' or '.join(DEVICES)})")
    a = ap.parse_args()
    device = device_named(a.device)
    if a.counts:
        arch = next(x for x in architectures(device) if x.name == a.counts)
        arch.pool_tokens = a.pool or arch.pool_tokens
        print(arch.pool(), *(step(arch, a.prompt, a.output, keep).running for _, keep in CONFIGS))
    elif a.cut_layers:
        print_cut_layers(a.prompt, a.output)
    else:
        print_table(a.prompt, a.output, device)


if __name__ == "__main__":
    main()
