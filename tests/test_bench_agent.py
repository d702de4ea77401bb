"""benchmarks/agent/bench_agent.py on the CPU: the agent workload of issue 19 through real
SGLang (a 2-layer Llama of the benchmark's family), and its request-row check."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from support import cli

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "agent" / "bench_agent.py"
TOOL = 16


def run_bench(tmp_path, *args, timeout=600):
    out = tmp_path / "row.json"
    argv = [sys.executable, str(BENCH), "--out", str(out), *args]
    if "--cpu-smoke" in args:  # it runs SGLang: from the session's forkserver (support.cli)
        return cli.run_all({"bench": argv}, timeout=timeout, fork_children=True)["bench"], out
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout), out


def test_session_continue_refuses_too_few_request_rows(tmp_path):
    # 8 open sessions hold 8 rows; their turns need 8 more: 10 would leave turns queued for
    # rows (0.5.17) or never admitted (0.5.23), so the benchmark refuses before starting.
    proc, out = run_bench(tmp_path, "--session-continue", "--conversations", "8", "--max-running-requests", "10",
                          timeout=60)
    assert proc.returncode == 2
    assert "needs --max-running-requests >= 16" in proc.stderr
    assert not out.exists()


@pytest.mark.sglang
@pytest.mark.newest_release  # a client of the server; the session suites cover both releases
def test_continued_conversations_prefill_only_the_new_tokens(tmp_path):
    proc, out = run_bench(
        tmp_path, "--cpu-smoke", "--policy", "kara", "--keep-ratio", "0.25", "--window", "64", "--buffer", "16",
        "--session-continue", "--conversations", "4", "--turns", "3", "--system-len", "64", "--task-len", "32",
        "--reply-len", "160", "--tool-len", str(TOOL), "--warmup-conversations", "1", "--max-running-requests", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(out.read_text())
    assert row["compression_events"] > 0
    first, *later = row["per_turn"]
    assert 32 <= first["prefilled_mean"] <= 64 + 32  # the task, and the shared system prompt unless cached
    for turn in later:
        assert turn["n"] == 4
        assert turn["prefilled_mean"] == TOOL + 1  # the tool output and the last reply token, no reply token
    # Each turn's replies were compressed: the conversation holds less KV than its tokens.
    conversation_tokens = 64 + 32 + 3 * 160 + 2 * TOOL
    assert later[-1]["kv_held_mean"] < conversation_tokens - 160
