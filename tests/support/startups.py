"""Counts SGLang start-ups (in-process engines, HTTP servers, command-line launches) per test
file, printed at the end of a pytest run: a start-up costs 20-50 s of imports on a 2-core CI
machine, so the count is what CI time is made of."""

from __future__ import annotations

import collections

_current_file = "(collection)"
COUNTS: collections.Counter = collections.Counter()


def set_current(nodeid: str) -> None:
    global _current_file
    _current_file = nodeid.split("::", 1)[0]


def record(kind: str) -> None:
    COUNTS[(_current_file, kind)] += 1


def launch_kind(args):
    """What a subprocess starting SGLang is: "http server" (`python -m sglang.launch_server
    --port ...`, or a repo script that launches one itself), "command line" (a launch that
    stops at start-up: a bad flag, `--help`), or None (not SGLang)."""
    if isinstance(args, (str, bytes)):
        args = str(args).split()
    words = [str(a) for a in args]
    if any(w.endswith("bench_agent.py") for w in words) and "--cpu-smoke" in words:
        return "http server"
    if "sglang.launch_server" in words or ("serve" in words and any(w.endswith("sglang") for w in words)):
        return "http server" if "--port" in words else "command line"
    return None


def export() -> list:
    """The counts as plain data (sent from a pytest-xdist worker to the controller)."""
    return [[path, kind, n] for (path, kind), n in COUNTS.items()]


def merge(rows) -> None:
    for path, kind, n in rows:
        COUNTS[(path, kind)] += n


def summary() -> list[str]:
    if not COUNTS:
        return []
    by_file = collections.defaultdict(dict)
    for (path, kind), n in COUNTS.items():
        by_file[path][kind] = n
    lines = [f"SGLang start-ups: {sum(COUNTS.values())} "
             f"({', '.join(f'{n} {k}' for k, n in sorted(_by_kind().items()))})"]
    for path in sorted(by_file):
        kinds = by_file[path]
        lines.append(f"  {sum(kinds.values()):3d}  {path}  ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))})")
    return lines


def _by_kind() -> collections.Counter:
    out = collections.Counter()
    for (_, kind), n in COUNTS.items():
        out[kind] += n
    return out
