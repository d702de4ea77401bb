"""Crossover of compression in multi-turn agents: GPU time re-prefilling compressed replies
against GPU time saved decoding them, from measured numbers only.

    python benchmarks/agent/crossover.py        # reads docs/results/{agent,throughput}.json + H100 logs

Inputs, all measured:
- per reply token, how many extra prompt tokens the next turn prefills because the reply was
  compressed (``agent.json``: Kara's prefilled tokens minus vanilla's, over the reply tokens
  of every turn that has a next turn; through the real server, per template style);
- the H100's prefill rate for this model shape (SGLang's own "input throughput" of its full
  8,192-token prefill batches in the vanilla serving log);
- the H100's decode throughput, vanilla and Kara, on the same workload (``throughput.json``).

GPU seconds per decoded token are 1 / throughput, so decoding a reply of L tokens with Kara
saves L x (1/V - 1/K) of GPU time when the pool is what limits V; the next turn spends
L x extra / P re-prefilling it. Compression pays while the first is larger:
K / V > 1 / (1 - extra x V / P). The prefill rate is that of 1k-token prompts; re-prefilling a
reply deep in a long conversation attends over more context and costs somewhat more, so the
break-even printed is a lower bound.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"
PREFILL_LINE = re.compile(r"Prefill batch.*#new-token: (\d+),.*input throughput \(token/s\): ([0-9.]+)")


def prefill_rate(log: Path) -> float:
    """Median prefill tokens/s of SGLang's full chunked-prefill batches (8,192 new tokens)."""
    rates = [float(m.group(2)) for m in map(PREFILL_LINE.search, log.read_text(errors="replace").splitlines())
             if m and int(m.group(1)) == 8192]
    return statistics.median(rates)


def extra_prefill_per_reply_token(agent_rows, style: str, policy: str) -> float:
    rows = {r["policy"]: r for r in agent_rows if r["style"] == style}
    kara, vanilla = rows[policy], rows["vanilla"]
    extra = kara["prefilled_total"] - vanilla["prefilled_total"]
    followed = sum(t["reply_tokens"] for t in kara["turns"][:-1])  # replies some next turn re-reads
    return extra / followed


def main() -> None:
    agent = json.loads((RESULTS / "agent.json").read_text())
    rows = json.loads((RESULTS / "throughput.json").read_text())
    rate = prefill_rate(RESULTS / "raw-2026-11-25b" / "log-vanilla.txt")
    print(f"H100 prefill rate (Llama-3.1-8B shape, full 8k-token batches): {rate:,.0f} tok/s "
          f"= {1e6 / rate:.1f} us per token")
    for style in ("keep", "drop"):
        for policy in ("kara-all", "kara-reasoning"):
            extra = extra_prefill_per_reply_token(agent, style, policy)
            print(f"\ntemplate {style}, {policy}: {extra:.3f} extra prefilled tokens per reply token")
            for r in rows:
                compressed = r.get("kv_tokens_evicted") or r.get("compression_events")
                if r["policy"] != "kara" or not r.get("gain_vs_vanilla") or not compressed \
                        or not r.get("complete", True):
                    continue
                v = r["output_tok_per_s"] / r["gain_vs_vanilla"]
                saved = 1e6 * (1 / v - 1 / r["output_tok_per_s"])
                cost = 1e6 * extra / rate
                breakeven = 1 / (1 - extra * v / rate) if extra * v < rate else float("inf")
                print(f"  {r['workload']:34} keep {r['keep_ratio']:<5}: gain {r['gain_vs_vanilla']:.2f}x, "
                      f"decode saves {saved:5.1f} us/token, re-prefill costs {cost:4.1f} us/token, "
                      f"net {saved - cost:+6.1f}; pays above {breakeven:.3f}x")


if __name__ == "__main__":
    main()
