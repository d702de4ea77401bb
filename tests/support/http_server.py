"""A real SGLang HTTP server with ``--kv-policy kara`` on the CPU, for the HTTP test suites.

Its command line is ``python -m sglang.launch_server ...``, run from the session's forkserver
(``support.processes``: SGLang already imported, the scheduler and detokenizer forked, not
spawned), or as a real subprocess with ``KARA_TEST_START_METHOD=spawn``."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from support import processes, startups

SERVER = [sys.executable, "-m", "sglang.launch_server"]
CPU_ARGS = ["--device", "cpu", "--attention-backend", "torch_native", "--disable-cuda-graph",
            "--max-total-tokens", "20000", "--skip-server-warmup", "--mem-fraction-static", "0.3"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url):
    with urllib.request.urlopen(url, timeout=30) as resp:
        return resp.read().decode()


class _ForkedServer:
    """A server started from the session's forkserver (``support.processes``), with the face of
    the ``Popen`` a real ``python -m sglang.launch_server`` would have: it leads its own
    session, so ``killpg(pid)`` ends it and the scheduler and detokenizer it forked."""

    def __init__(self, process):
        self._process, self.pid = process, process.pid

    def poll(self):
        return self._process.exitcode

    def wait(self, timeout=None):
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired("sglang.launch_server", timeout)
        return self._process.exitcode


def serve(tiny_model, tmp_path_factory, extra=(), env=None):
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    args = SERVER + ["--model-path", str(tiny_model), "--host", "127.0.0.1", "--port", str(port),
                     "--kv-policy", "kara", "--kara-window", "32", "--kara-buffer", "8",
                     "--kara-keep-ratio", "0.25", "--kara-chunk-size", "2", "--enable-metrics",
                     "--decode-log-interval", "5"] + CPU_ARGS + list(extra)
    if processes.START_METHOD == "forkserver":
        startups.record("http server")
        proc = _ForkedServer(processes.start_command_line(args, str(log), str(log), env=env, fork_children=True))
    else:
        with open(log, "w") as sink:
            proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, **(env or {})), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        # A start-up takes about 50 s on a 2-core CI machine, over 120 s while another job
        # loads it (CI installs two venvs beside the first suite).
        deadline = time.monotonic() + 360
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError("server exited:\n" + log.read_text()[-3000:])
            try:
                get(base + "/health")
                break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("server did not come up:\n" + log.read_text()[-3000:])
        yield base, proc, log
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
