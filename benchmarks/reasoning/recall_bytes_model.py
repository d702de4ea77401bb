"""Bytes model of Kara + recall: which tier for evicted KV can keep the throughput goal.

    python benchmarks/reasoning/recall_bytes_model.py [--keep 0.25] [--tokens 256] [--churn 85]
    python benchmarks/reasoning/recall_bytes_model.py --horizon 1024 2048 4096   # bounded tiers

The same model as the throughput rows (benchmarks/report_throughput.py): a decode step reads
the weights and every running request's KV, so throughput(C) = C x bandwidth / (weights + C x
bytes a request's step reads), with C the requests the KV pool holds at their peak (at most
256, the decode batch limit). Workload and pool are the H200 headline's: Llama-3.1-8B shape,
1024-token prompts + 16,384 output tokens, 845,617 bf16 tokens of pool, vanilla at 48
requests. Kara's resident KV over a request's life comes from its own window bookkeeping
(W 512, U 64, γ 8). Per design, in bf16 token-equivalents (131 KB each):

- plain Kara: resident tokens only.
- GPU tier, q bits: evicted K and V kept on the GPU at q bits per value plus a bf16 scale and
  minimum per group of 32 channels, (q + 1) / 16 of bf16; each step ranks every evicted token
  by its q-bit key (half a token's bytes). As built (kara_sglang/recall_tier.py), the R picks
  live dequantised in a per-request buffer of R pool slots: the buffer is bf16 memory, SGLang's
  attention reads all R of it each step, and the picks not held one step earlier (``--churn``)
  are read at q bits and written in bf16. Dummy weights renew nearly every pick each step
  (``--churn 256``); the probe's trained model 61-91. The page bounds of ``--kara-recall-pages``
  (1/16 of bf16 per tier token) are not counted.
- GPU tier bounded to a horizon (``--horizon H``): as above, but a request's tier holds only
  its last H evicted tokens; older windows fall back to plain eviction (what a recency bound
  on the tier would do: recall reaches back H evicted tokens, no further).
- host tier: evicted K and V in host memory; a 2-bit key digest per evicted token stays on the
  GPU (3/16 of the key); each step ranks by it, and the selected tokens that were not selected
  one step earlier (``--churn`` of R per layer and KV head: the probe measured 61-91 of 256)
  cross PCIe (``--pcie`` GB/s, assumed) before the layer can attend: lag 0, on the critical
  path, not overlapped with anything.

It prints, per design, the peak and mean memory of a request, C, the modelled tokens/s and the
gain over vanilla's modelled tokens/s. Plain Kara 25%'s modelled gain against its measured
2.60x calibrates how far the model is optimistic.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

WEIGHT_BYTES = 16.06e9  # Llama-3.1-8B, bf16
TOKEN_BYTES = 32 * 8 * 128 * 2 * 2  # layers x KV heads x head_dim x (K, V) x bf16
BANDWIDTH = 4.3e12  # H200 device copy bandwidth (the device library's KINDS.md)
POOL_TOKENS = 845_617  # --mem-fraction-static 0.85 on the H200, bf16
MAX_RUNNING = 256


def resident_profile(prompt: int, output: int, keep: float, window: int = 512, buffer: int = 64):
    """Per decode step: (resident tokens, evicted tokens) of one request under plain Kara."""
    from kara_sglang import KaraConfig, WindowState, make_policy

    policy = make_policy(KaraConfig(policy="kara", window=window, buffer=buffer, keep_ratio=keep))
    state, steps = WindowState(prompt_len=prompt), []
    for i in range(output):
        state.on_decode()
        steps.append((state.kv_len, prompt + i + 1 - state.kv_len))
        task = policy.plan(state)
        if task is not None:
            state.apply(task, policy.tail_consumed(task))
    return steps


def tok_per_s(concurrency: float, step_tokens: float) -> float:
    return concurrency * BANDWIDTH / (WEIGHT_BYTES + concurrency * step_tokens * TOKEN_BYTES)


def recall_buffer(tokens: int, evicted: int) -> int:
    """bf16 tokens of a request's recall buffer: its R pool slots, from its first compression on."""
    return tokens if evicted else 0


def gpu_tier(steps, bits: int, tokens: int, horizon: int = 0, churn: int = 85):
    """(peak memory, mean step bytes) of a q-bit GPU tier holding the last ``horizon`` evicted
    tokens of a request (0: all of them), with its R-slot bf16 recall buffer from the first
    compression on, ``churn`` of whose picks are rewritten each step."""
    frac = (bits + 1) / 16
    held = [(r, min(e, horizon) if horizon else e) for r, e in steps]
    memory = max(r + recall_buffer(tokens, e) + e * frac for r, e in held)
    step = sum(r + e * frac / 2 + recall_buffer(tokens, e) + min(churn, tokens, e) * (frac + 1)
               for r, e in held) / len(held)
    return memory, step


def design_rows(steps, prompt: int, output: int, tokens: int, churn: int, pcie: float, horizons=()):
    """(name, peak memory, mean step bytes, PCIe bytes per step) per request, in bf16 tokens."""
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    rows = [("vanilla", prompt + output, prompt + output / 2, 0.0)]
    rows.append(("plain Kara", max(r for r, _ in steps), mean([r for r, _ in steps]), 0.0))
    for bits in (4, 3, 2):
        rows.append((f"GPU tier, {bits}-bit KV", *gpu_tier(steps, bits, tokens, churn=churn), 0.0))
    for horizon in horizons:
        rows.append((f"GPU tier, 4-bit KV, last {horizon:,} evicted", *gpu_tier(steps, 4, tokens, horizon, churn), 0.0))
    digest = 3 / 16 / 2  # 2-bit keys + scale/min per 32 channels, keys only
    memory = max(r + e * digest + recall_buffer(tokens, e) for r, e in steps)
    step = mean([r + e * digest + min(tokens, e) for r, e in steps])
    moved = mean([min(churn, e) for _, e in steps])
    rows.append((f"host tier, 2-bit digest, churn {churn}", memory, step, moved))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keep", type=float, nargs="+", default=[0.25, 0.125])
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--output", type=int, default=16384)
    ap.add_argument("--tokens", type=int, default=256, help="R: evicted tokens selected per layer and KV head")
    ap.add_argument("--churn", type=int, default=85,
                    help="of R, newly selected each step (the GPU tier's buffer writes, the host tier's PCIe)")
    ap.add_argument("--pcie", type=float, default=55.0, help="host-to-device GB/s (assumed)")
    ap.add_argument("--horizon", type=int, nargs="*", default=[],
                    help="also 4-bit tiers holding only each request's last H evicted tokens")
    a = ap.parse_args()
    print(f"Llama-3.1-8B shape, {a.prompt} + {a.output} tokens, pool {POOL_TOKENS:,} bf16 tokens, "
          f"R {a.tokens}; memory and step bytes per request in bf16 tokens ({TOKEN_BYTES // 1024} KiB)")
    print("| keep | design | peak memory | requests | step reads | PCIe MB/step | tok/s (model) | vs vanilla |")
    print("|---|---|---|---|---|---|---|---|")
    base = None
    for keep in a.keep:
        steps = resident_profile(a.prompt, a.output, keep)
        for name, memory, step, moved in design_rows(steps, a.prompt, a.output, a.tokens, a.churn, a.pcie,
                                                        a.horizon):
            c = min(MAX_RUNNING, POOL_TOKENS // memory)
            hbm_s = (WEIGHT_BYTES + c * step * TOKEN_BYTES) / BANDWIDTH
            pcie_s = c * moved * TOKEN_BYTES / (a.pcie * 1e9)
            rate = c / (hbm_s + pcie_s)
            if base is None:
                base = rate
            if name == "vanilla" and keep != a.keep[0]:
                continue
            print(f"| {'-' if name == 'vanilla' else f'{keep:.1%}'} | {name} | {memory:,.0f} | {c:.0f} | "
                  f"{step:,.0f} | {c * moved * TOKEN_BYTES / 1e6:,.0f} | {rate:,.0f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
