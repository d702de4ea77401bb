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


# free_port() only finds a port free now: another test process's engine (ZMQ, NCCL and
# SGLang's own ports) can take it during the ~50 s before the server binds it. Measured once
# on CI: "[Errno 98] ... address already in use", and the server shut down. Such a start is
# retried on a fresh port.
PORT_TAKEN = "address already in use"
START_ATTEMPTS = 3


def _start(tiny_model, tmp_path_factory, extra, env):
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
    return f"http://127.0.0.1:{port}", proc, log


def _stop(proc):
    """Ends the server and what it started (its session's process group), if any is left."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:  # the whole group already exited
        return
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _wait_healthy(base, proc, log) -> bool:
    """True once /health answers; False if the server exited because its port was taken."""
    # A start-up takes about 50 s on a 2-core CI machine, over 120 s while another job
    # loads it (CI installs two venvs beside the first suite).
    deadline = time.monotonic() + 360
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text()
            if PORT_TAKEN in text:
                return False
            raise AssertionError("server exited:\n" + text[-3000:])
        try:
            get(base + "/health")
            return True
        except OSError:
            time.sleep(0.5)
    raise AssertionError("server did not come up:\n" + log.read_text()[-3000:])


def serve(tiny_model, tmp_path_factory, extra=(), env=None):
    for _ in range(START_ATTEMPTS):
        base, proc, log = _start(tiny_model, tmp_path_factory, extra, env)
        try:
            up = _wait_healthy(base, proc, log)
        except BaseException:
            _stop(proc)
            raise
        if up:
            break
        _stop(proc)
    else:
        raise AssertionError(f"server ports taken {START_ATTEMPTS} times:\n" + log.read_text()[-3000:])
    try:
        yield base, proc, log
    finally:
        _stop(proc)
