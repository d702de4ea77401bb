"""Scored replies -> one row per setting, the printed table, the JSON and records files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from kara_sglang.accuracy.answers import Extractor, answers_match
from kara_sglang.accuracy.client import Reply
from kara_sglang.accuracy.kv import RequestKV, request_kv
from kara_sglang.accuracy.problems import Problem
from kara_sglang.accuracy.settings import Setting
from kara_sglang.accuracy.stats import wilson_interval


@dataclass(frozen=True)
class Outcome:
    """One problem under one setting."""
    problem: Problem
    reply: Reply
    extracted: Optional[str]
    correct: bool
    kv: Optional[RequestKV]

    @property
    def completion_tokens(self) -> int:
        return int(self.reply.meta_info.get("completion_tokens") or 0)


def _mean(values: List[float]) -> Optional[float]:
    return sum(values) / len(values) if values else None


def summarize(setting: Setting, outcomes: List[Outcome], wall_s: float) -> Dict[str, Any]:
    """The setting's row. A failed request counts in ``n`` as not correct (and in ``errors``)."""
    n = len(outcomes)
    correct = sum(o.correct for o in outcomes)
    low, high = wilson_interval(correct, n)
    answered = [o for o in outcomes if o.reply.error is None]
    measured = [o.kv for o in answered if o.kv is not None]
    errors = [o.reply.error for o in outcomes if o.reply.error is not None]
    output_tokens = sum(o.completion_tokens for o in answered)
    return {
        "setting": setting.label,
        "custom_params": setting.custom_params,
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else None,
        "ci95": [low, high],
        "kv_mean_fraction": _mean([kv.fraction for kv in measured]),
        "kv_mean_tokens": _mean([kv.mean_tokens for kv in measured]),
        "kv_measured": len(measured),  # answered requests whose response had the KV lists
        "output_tokens_mean": _mean([float(o.completion_tokens) for o in answered]),
        "output_tokens_per_s": output_tokens / wall_s if wall_s > 0 else None,
        "wall_s": wall_s,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
    }


COLUMNS = ("setting", "n", "correct", "accuracy", "95% CI", "KV kept", "KV tokens", "out tok",
           "out tok/s", "errors")


def _cells(row: Dict[str, Any]) -> List[str]:
    def num(value, fmt):
        return "n/a" if value is None else format(value, fmt)

    low, high = row["ci95"]
    return [row["setting"], str(row["n"]), str(row["correct"]),
            num(None if row["accuracy"] is None else 100 * row["accuracy"], ".1f") + "%",
            f"{100 * low:.1f}-{100 * high:.1f}%",
            num(None if row["kv_mean_fraction"] is None else 100 * row["kv_mean_fraction"], ".1f")
            + ("%" if row["kv_mean_fraction"] is not None else ""),
            num(row["kv_mean_tokens"], ".0f"), num(row["output_tokens_mean"], ".0f"),
            num(row["output_tokens_per_s"], ".1f"), str(row["errors"])]


def format_table(rows: Iterable[Dict[str, Any]]) -> str:
    rows = list(rows)
    table = [list(COLUMNS)] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in table]
    notes = []
    if any(r["kv_mean_fraction"] is None and r["n"] > r["errors"] for r in rows):
        notes.append("KV n/a: the responses carry no kv_tokens_kept (a server without kara-sglang?)")
    for r in rows:
        if r["first_error"]:
            notes.append(f"{r['setting']}: {r['errors']} failed, first: {r['first_error']}")
    return "\n".join(lines + notes)


def write_results(path: str | Path, server: str, model: Optional[str], data: str,
                  rows: List[Dict[str, Any]], sglang_version: Optional[str] = None,
                  kara_config: Optional[Dict[str, Any]] = None) -> None:
    """``sglang_version`` and ``kara_config`` (the server's own settings) come from the server,
    so a results file says what ran without the caller restating it."""
    Path(path).write_text(json.dumps({"server": server, "model": model, "data": data,
                                      "sglang_version": sglang_version, "kara_config": kara_config,
                                      "rows": rows}, indent=1) + "\n")


def record(setting: Setting, outcome: Outcome) -> Dict[str, Any]:
    """One line of ``--records``."""
    kv = outcome.kv
    meta = outcome.reply.meta_info
    return {
        "setting": setting.label,
        "index": outcome.problem.index,
        "line": outcome.problem.line,
        "output": outcome.reply.text,
        "extracted": outcome.extracted,
        "reference": outcome.problem.reference,
        "correct": outcome.correct,
        "prompt_tokens": meta.get("prompt_tokens"),
        "completion_tokens": meta.get("completion_tokens"),
        "finish_reason": meta.get("finish_reason"),
        "kv_fraction": kv.fraction if kv else None,
        "kv_mean_tokens": kv.mean_tokens if kv else None,
        "kv_final_kept": kv.final_kept if kv else None,
        "kv_final_evicted": kv.final_evicted if kv else None,
        # Decode KV held per block of decode tokens at the end (servers run with KARA_TRACK_KEPT).
        "kv_kept_per_block": next((v for v in reversed(meta.get("kv_kept_per_block") or []) if v is not None), None),
        "error": outcome.reply.error,
    }


def score(problem: Problem, reply: Reply, extractor: Extractor) -> Outcome:
    extracted = extractor(reply.text) if reply.error is None else None
    return Outcome(problem, reply, extracted, answers_match(extracted, problem.reference), request_kv(reply.meta_info))
