"""run_grid.py's rows and records -> docs/results/reasoning_accuracy.json, a plot, a table.

    python benchmarks/reasoning/report.py --grid DIR --device "NVIDIA H200" \
        --out docs/results/reasoning_accuracy.json --plot docs/reasoning_accuracy.png \
        --per-problem docs/results/raw-2026-11-30/reasoning_per_problem.json.gz

Rows carry the task's fields (task, style, policy, keep_ratio, window, buffer, chunk, budget,
n, accuracy, ci_low, ci_high, kv_mean_fraction, full_kv_accuracy, device, sglang_version) plus
the mean decode KV in tokens and block coverage: the share of whole 512-token blocks of the
reasoning that hold no KV at all when the request ends (servers ran with KARA_TRACK_KEPT=512).

Nothing about the run is assumed here: W, U and γ come from what the server reported
(``kara_config`` in each rows file, written by kara-accuracy from ``/server_info``), else from
the lane's launch flags in ``plan.json`` with the plugin's defaults for flags not given; γ of a
row is its request's ``kara_chunk_size`` when it set one. The SGLang version comes from the
rows file (the server's ``/server_info``), else from ``plan.json`` (run_grid records the
installed release), else from ``--sglang-version`` (for grids that recorded neither); a grid
with none of them is refused.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import sys
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from kara_sglang.config import KaraConfig  # noqa: E402

DEFAULTS = KaraConfig()  # the plugin's defaults: what a server ran for a flag it was not given


def flag(args: list, name: str) -> Optional[str]:
    """A launch flag's value in a lane's server args, or None."""
    return args[args.index(name) + 1] if name in args else None


def lane_config(lane: dict, reported: Optional[dict]) -> dict:
    """Server-level settings of a lane: what the server reported, else its launch flags."""
    args = lane.get("args", [])
    policy = flag(args, "--kv-policy") or "none"
    reported = reported or {}

    def setting(key: str, name: str, default):
        if reported.get(key) is not None:
            return reported[key]
        value = flag(args, name)
        return type(default)(value) if value is not None else default

    return {"policy": policy, "window": setting("window", "--kara-window", DEFAULTS.window),
            "buffer": setting("buffer", "--kara-buffer", DEFAULTS.buffer),
            "chunk": setting("chunk_size", "--kara-chunk-size", DEFAULTS.chunk_size),
            "recall_tokens": setting("recall_tokens", "--kara-recall-tokens", DEFAULTS.recall_tokens),
            "recall_digest": setting("recall_digest", "--kara-recall-digest", DEFAULTS.recall_digest),
            "recall_lag": setting("recall_lag", "--kara-recall-lag", DEFAULTS.recall_lag),
            "recall_kv": setting("recall_kv", "--kara-recall-kv", DEFAULTS.recall_kv),
            "recall_tier_tokens": setting("recall_tier_tokens", "--kara-recall-tier-tokens",
                                          DEFAULTS.recall_tier_tokens),
            "recall_pages": setting("recall_pages", "--kara-recall-pages", DEFAULTS.recall_pages),
            "recall_horizon": setting("recall_horizon", "--kara-recall-horizon", DEFAULTS.recall_horizon)}


def row_for(cfg: dict, style: str, row: dict, device: str, sglang_version: str) -> dict:
    params = row["custom_params"] or {}
    vanilla = params.get("kv_policy") == "none" or cfg["policy"] == "none"
    policy = "full" if vanilla else cfg["policy"]
    low, high = row["ci95"]
    return {
        "task": "ledger", "style": style, "policy": policy, "setting": row["setting"],
        "keep_ratio": None if vanilla else params.get("kara_keep_ratio"),
        # W only shapes the window policies; U is every policy's uncompressed buffer.
        "window": cfg["window"] if policy in ("kara", "cask") else None, "buffer": None if vanilla else cfg["buffer"],
        "chunk": None if vanilla or policy not in ("kara", "cask") else params.get("kara_chunk_size", cfg["chunk"]),
        "budget": params.get("kara_budget"), "n": row["n"], "correct": row["correct"],
        "accuracy": row["accuracy"], "ci_low": low, "ci_high": high,
        "kv_mean_fraction": row["kv_mean_fraction"], "kv_mean_tokens": row["kv_mean_tokens"],
        "output_tokens_mean": row["output_tokens_mean"], "errors": row["errors"],
        "device": device, "sglang_version": sglang_version,
        # Recall (kara_sglang/recall.py): evicted tokens attended again per layer and KV head.
        "recall": None if vanilla or not cfg.get("recall_tokens") else {
            # A tier ranks by its own codes (--kara-recall-digest is the emulation's).
            "tokens": cfg["recall_tokens"], "lag": cfg["recall_lag"],
            "digest": cfg["recall_kv"] if cfg.get("recall_tier_tokens") else cfg["recall_digest"],
            "kv": cfg["recall_kv"],
            # The GPU tier (the real thing; without it, the emulation that keeps evicted slots).
            **({"tier_tokens": cfg["recall_tier_tokens"], "pages": cfg["recall_pages"],
                "horizon": cfg["recall_horizon"]} if cfg.get("recall_tier_tokens") else {})},
    }


def read_records(grid: Path, tag: str) -> list:
    """A rows file's records: ``records-<tag>.jsonl.gz`` (run_grid compresses them) or ``.jsonl``."""
    gz = grid / f"records-{tag}.jsonl.gz"
    f = gzip.open(gz, "rt") if gz.exists() else open(grid / f"records-{tag}.jsonl")
    with f:
        return [json.loads(line) for line in f]


def empty_block_share(records: list) -> float | None:
    """Share of whole blocks (all but each request's last, partial one) holding no KV."""
    empty = total = 0
    for rec in records:
        blocks = rec.get("kv_kept_per_block")
        if blocks:
            whole = blocks[:-1]
            empty += sum(1 for b in whole if b == 0)
            total += len(whole)
    return empty / total if total else None


def rows_from_other_runs(path: Path) -> list:
    """Rows another script added to an existing output (paired_lanes.py's, each naming its
    ``source``): a grid's report replaces its own rows, not theirs."""
    return [r for r in json.loads(path.read_text()) if r.get("source")] if path.exists() else []


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grid", required=True, help="run_grid.py's output folder")
    ap.add_argument("--device", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--per-problem", default=None, help="gzipped JSON of every (row, problem): correct, KV")
    ap.add_argument("--sglang-version", default=None,
                    help="only for grids whose rows files and plan.json do not record it")
    a = ap.parse_args()

    grid = Path(a.grid)
    plan = json.loads((grid / "plan.json").read_text())
    lanes = {lane["name"]: lane for lane in plan["lanes"]}
    rows, per_problem = [], {}
    for path in sorted(glob.glob(f"{a.grid}/rows-*.json")):
        tag = Path(path).stem[len("rows-"):]
        notrace = tag.startswith("notrace-")
        style = tag.split("-")[1] if notrace else ("dense" if "-dense-" in tag else "verbose")
        # run_grid runs the no-trace rows on the main Kara lane's server, opted out.
        lane = plan.get("notrace_lane", "kara-w512-u64") if notrace else tag.split(f"-{style}-")[0]
        result = json.loads(Path(path).read_text())
        version = result.get("sglang_version") or plan.get("sglang_version") or a.sglang_version
        if not version:
            sys.exit(f"{path}: no SGLang version in the rows file or plan.json; pass --sglang-version")
        cfg = lane_config(lanes[lane], result.get("kara_config"))
        records = read_records(grid, tag)
        for r in result["rows"]:
            row = row_for(cfg, style, r, a.device, version)
            if notrace:
                row.update(policy="full, answer without reasoning", setting="no-trace")
            row["empty_block_share"] = empty_block_share(records)
            rows.append(row)
            per_problem[f"{style}/{row['setting']}/{tag if notrace else lane}"] = [
                [rec["index"], rec["correct"], rec["completion_tokens"], rec["kv_fraction"]] for rec in records]
    full = {r["style"]: r["accuracy"] for r in rows if r["policy"] == "full"}
    for r in rows:
        r["full_kv_accuracy"] = full.get(r["style"])
    order = {"full": 0, "kara": 1, "cask": 2, "threshold": 3, "streaming": 4, "longflow": 5}
    rows.sort(key=lambda r: (r["style"] != "verbose", order.get(r["policy"], 9), r["recall"] is not None,
                             str(r["recall"]), -(r["keep_ratio"] or 0),
                             r["window"] or 0, -(r["buffer"] or 0), -(r["chunk"] or 0)))
    Path(a.out).write_text(json.dumps(rows + rows_from_other_runs(Path(a.out)), indent=1) + "\n")
    print("| style | policy | setting | W | U | γ | accuracy | 95% CI | decode KV kept | empty 512-blocks |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        recall = r["recall"]
        policy = r["policy"] + (f" + recall {recall['tokens']} {recall['digest']} lag {recall['lag']}"
                                + (f" kv {recall['kv']}" if recall.get("kv", "exact") != "exact" else "")
                                + (f" GPU tier, {recall['pages']} pages, horizon {recall['horizon']}"
                                   if recall.get("tier_tokens") else "")
                                if recall else "")
        print(f"| {r['style']} | {policy} | {r['setting']} | {r['window'] or '—'} | {r['buffer'] or '—'} | "
              f"{r['chunk'] or '—'} | {100 * r['accuracy']:.1f}% | {100 * r['ci_low']:.1f}-{100 * r['ci_high']:.1f}% | "
              f"{100 * r['kv_mean_fraction']:.1f}% | "
              f"{'—' if r['empty_block_share'] is None else format(100 * r['empty_block_share'], '.1f') + '%'} |")
    if a.per_problem:
        Path(a.per_problem).parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(a.per_problem, "wt") as f:
            json.dump({"fields": ["index", "correct", "completion_tokens", "kv_fraction"], "rows": per_problem}, f)
    if a.plot:
        plot(rows, a.plot)


def plot(rows: list, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    marks = {"kara": "o-", "cask": "s", "threshold": "^", "streaming": "v", "longflow": "D"}
    for ax, style in zip(axes, ("verbose", "dense")):
        mine = [r for r in rows if r["style"] == style]
        full = next(r for r in mine if r["policy"] == "full")
        ax.axhline(100 * full["accuracy"], color="k", ls="--", lw=1, label="full KV")
        # The keep-ratio sweep: Kara rows at the plugin's default W, U and γ (the ablations differ).
        kara = sorted((r for r in mine if r["policy"] == "kara" and r["window"] == DEFAULTS.window
                       and r["buffer"] == DEFAULTS.buffer and r["chunk"] == DEFAULTS.chunk_size),
                      key=lambda r: r["kv_mean_fraction"])
        for name, group in [("kara", kara)] + [(p, [r for r in mine if r["policy"] == p])
                                               for p in ("cask", "threshold", "streaming", "longflow")]:
            if not group:
                continue
            x = [100 * r["kv_mean_fraction"] for r in group]
            y = [100 * r["accuracy"] for r in group]
            err = [[100 * (r["accuracy"] - r["ci_low"]) for r in group], [100 * (r["ci_high"] - r["accuracy"]) for r in group]]
            ax.errorbar(x, y, yerr=err, fmt=marks[name], capsize=3,
                        label="Kara (keep 12.5/25/50%)" if name == "kara" else name)
        ax.set_title(f"ledger, {style} traces (n = {full['n']} each)")
        ax.set_xlabel("mean decode KV kept (% of full, measured by the server)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final-answer accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
