"""examples/agent_frontend.py: an SGLang frontend program (fork/join, gen, select) against a
real Kara server on the CPU, over several turns whose long generations get compressed."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from support.engines import use_cpu_sglang
from support.http_server import get

# The frontend example is a client of the server: no release-specific path of its own.
pytestmark = [pytest.mark.sglang, pytest.mark.newest_release]

use_cpu_sglang()

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "agent_frontend.py"


@pytest.fixture(scope="module")
def kara_server(kara_http_server):
    return kara_http_server  # --kv-policy kara, W = 32, U = 8 (tests/conftest.py)


def test_frontend_agent_runs_its_turns_and_the_server_compresses(kara_server):
    base, proc, log = kara_server
    turns, think = 3, 120  # W = 32, U = 8 on the test server: each thought compresses twice or more
    out = subprocess.run([sys.executable, str(EXAMPLE), "--url", base, "--turns", str(turns),
                          "--think-tokens", str(think)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("turn ")]
    assert len(lines) == turns
    for line in lines:
        tool = line.rsplit("tool = ", 1)[1]
        assert tool in ("search", "calculator", "finish")
        thought = int(re.search(r"thought (\d+) tokens", line)[1])
        evicted = int(re.search(r"KV evicted: (\d+)", line)[1])
        assert 0 < thought <= think
        if thought >= 32 + 8 + 2:  # past one window + buffer: Kara must have compressed
            assert evicted > 0
    counters = json.loads(out.stdout.splitlines()[-1].split("server: ", 1)[1])
    assert counters["compression_events"] > 0
    assert get(base + "/health") is not None  # the server is still serving
    assert proc.poll() is None
