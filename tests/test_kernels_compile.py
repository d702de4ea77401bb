"""The recall tier's kernels compile for a Hopper GPU (sm_90), on this machine, without one.

Triton's CPU interpreter runs code the GPU compiler refuses (a reassigned constexpr inside a
static loop passed every interpreter test of kernels/select_top.py and failed to compile), so
benchmarks/kernel_resources.py compiles each kernel ahead of time at the serving headline's
shape, with the launch settings the GPU benchmark tries, and ptxas reports their resources."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tier_kernels_compile_for_sm90_without_spills():
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_resources.py"), "--arch", "90"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    assert len(lines) == 27 and sum(line.startswith("rank_tier") for line in lines) == 15, run.stdout
    assert sum(line.startswith("rank_pages") for line in lines) == 4, run.stdout
    assert sum("selecting" in line for line in lines) == 4, run.stdout
    assert sum("sorted" in line for line in lines) == 4, run.stdout
    assert sum(line.startswith("refresh_recall_buffer") for line in lines) == 2, run.stdout
    for line in lines:
        assert " 0 B spilled" in line, line
