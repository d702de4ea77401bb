"""Where a policy loses likelihood: its ΔNLL against full KV, split by how far back the
current token's bigram last occurred in the forced text (a proxy for copying from earlier
text: tight loops, mid-range copies, long-range copies, or new text).

    python benchmarks/fidelity/copy_distance.py data/fidelity_teacher_forced_raw_w512_gpu.json.gz \\
        "Kara 0.25 γ=8 U=64" "threshold B=787 (≈Kara 0.25)"

Reads teacher_forced.py's raw records (the curve requests only) and counts the positions from
``--from`` on (default: where every row of the run has compressed, measured as the harness
does), so the split compares how policies choose, not when they start.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from teacher_forced import first_compression, read_raw, unpack  # noqa: E402  (the records' one reader)

BUCKETS = ((64, "loop: < 64 back"), (576, "64-575 back"), (1500, "576-1,499 back"),
           (None, ">= 1,500 back"))
NEW = "new bigram"


def bigram_distances(tokens):
    """For each position, how far back its (previous, current) token pair last occurred."""
    last, out = {}, []
    for p, tok in enumerate(tokens):
        key = (tokens[p - 1] if p else None, tok)
        out.append(p - last[key] if key in last else None)
        last[key] = p
    return out


def bucket_of(distance):
    if distance is None:
        return NEW
    return next(name for bound, name in BUCKETS if bound is None or distance < bound)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("raw")
    ap.add_argument("labels", nargs="+", help="row labels as the harness prints them")
    ap.add_argument("--from", dest="start", type=int, default=None,
                    help="first position counted (default: the run's all-compressed position)")
    args = ap.parse_args()
    data = read_raw(args.raw)
    requests = data["requests"]
    results = {c[0]: [unpack(item, r) for item, r in zip(c[7], requests)] for c in data["configs"]}
    start = args.start
    if start is None:
        firsts = [first_compression(requests, res) for label, res in results.items() if label != "full KV"]
        start = max((f for f in firsts if f is not None), default=0)
    curve = [i for i, r in enumerate(requests) if r["curve"]]
    for label in args.labels:
        delta, count = defaultdict(float), defaultdict(int)
        for i in curve:
            dist = bigram_distances(requests[i]["forced"])
            ours, ref = results[label][i][1], results["full KV"][i][1]
            for p in range(start, min(len(ours), len(ref), len(dist))):
                b = bucket_of(dist[p])
                delta[b] += ref[p]["logp"] - ours[p]["logp"]  # NLL(policy) - NLL(full)
                count[b] += 1
        names = [name for _, name in BUCKETS] + [NEW]
        print(f"{label:32} " + "  ".join(f"{n}: {delta[n] / count[n]:+.4f} ({count[n]})"
                                          for n in names if count[n]))


if __name__ == "__main__":
    main()
