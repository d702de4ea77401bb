"""Compress a synthetic long decode with every policy and print what each kept.

Runs anywhere: on a machine without a GPU the Triton kernels run on Triton's CPU
interpreter. Random K/V/Q stand in for a model (the real server demo needs SGLang).

    python examples/demo_compress.py [--steps N] [--requests N] [--prompt N] [--window W] [--buffer U]

The defaults are sized to the device. On a GPU: 4 requests x (256 prompt + 2,048 decode)
tokens, W = 256, U = 32. On a CPU, where the interpreter runs each Triton program in Python
(those GPU sizes took 39 s of scorer time per policy there, over 5 minutes in all): 2 requests
x (64 + 384) tokens, W = 128, U = 64, which finishes in under a minute: 31.6 s wall
(`time python examples/demo_compress.py`, 2-core CPU shared with other work).
"""

import argparse
import os
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kara_sglang import KaraConfig, WindowState, make_policy  # noqa: E402  (after TRITON_INTERPRET is set)
from kara_sglang.synthetic import SyntheticDecode  # noqa: E402


# Defaults per device (see the docstring): Triton's CPU interpreter is far slower than a GPU.
GPU_DEFAULTS = dict(steps=2048, requests=4, prompt=256, window=256, buffer=32)
CPU_DEFAULTS = dict(steps=384, requests=2, prompt=64, window=128, buffer=64)


def final_decode_kv(config: KaraConfig, steps: int) -> int:
    """Decode KV a request holds after ``steps`` tokens under ``config`` (bookkeeping only)."""
    policy, state = make_policy(config), WindowState(prompt_len=0)
    for _ in range(steps):
        state.on_decode()
        task = policy.plan(state)
        if task is not None:
            state.apply(task, policy.tail_consumed(task))
    return state.decode_kv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS
    ap.add_argument("--steps", type=int, default=sizes["steps"], help="decode steps per request")
    ap.add_argument("--requests", type=int, default=sizes["requests"])
    ap.add_argument("--prompt", type=int, default=sizes["prompt"], help="prompt tokens per request")
    ap.add_argument("--page-size", type=int, default=1)
    ap.add_argument("--window", type=int, default=sizes["window"], help="Kara window W")
    ap.add_argument("--buffer", type=int, default=sizes["buffer"], help="Kara buffer U")
    args = ap.parse_args()
    w, u = args.window, args.buffer
    kara = KaraConfig(policy="kara", window=w, buffer=u, keep_ratio=0.25)
    matched = final_decode_kv(kara, args.steps)  # baselines end with the same decode KV
    policies = {
        "none": KaraConfig(policy="none"),
        "kara 25%": kara,
        "kara 25% gamma=1": KaraConfig(policy="kara", window=w, buffer=u, keep_ratio=0.25, chunk_size=1),
        f"threshold {matched}": KaraConfig(policy="threshold", budget=matched, buffer=u),
        f"streaming {matched}": KaraConfig(policy="streaming", budget=matched, buffer=u),
        f"longflow {matched}": KaraConfig(policy="longflow", budget=matched, buffer=u),
    }
    print(f"device={device} interpreter={os.environ.get('TRITON_INTERPRET', '0')} "
          f"requests={args.requests} prompt={args.prompt} decode_steps={args.steps} "
          f"page_size={args.page_size}")
    print(f"{'policy':<20}{'KV kept':>9}{'evicted':>9}{'kept %':>8}{'events':>8}"
          f"{'scorer ms':>11}{'compress ms':>13}")
    for name, cfg in policies.items():
        sim = SyntheticDecode(cfg, [args.prompt] * args.requests, num_layers=8, q_heads=8,
                              kv_heads=2, head_dim=64, num_slots=args.requests * (args.prompt + args.steps) + 64 * args.page_size + 64,
                              page_size=args.page_size, max_context=args.prompt + args.steps + 8,
                              dtype=torch.bfloat16, device=device, profile=True)
        for _ in range(args.steps):
            sim.step()
        kept = sum(r.state.kv_len for r in sim.requests)
        evicted = sum(r.state.evicted for r in sim.requests)
        stats = sim.compressor.stats
        print(f"{name:<20}{kept:>9}{evicted:>9}{100 * kept / (kept + evicted):>7.1f}%"
              f"{stats.events:>8}{1e3 * stats.score_seconds:>11.1f}{1e3 * sim.compress_seconds:>13.1f}")
        sim.finish_all()
        assert sim.alloc.free_slots == sim.idle_free, "KV slots leaked"


if __name__ == "__main__":
    main()
