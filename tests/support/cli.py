"""SGLang command lines that stop at start-up (bad flags, ``--help``), run side by side.

Each such run is one process that would spend 25-45 s of one core (on a 2-core CI machine)
importing SGLang and then stop. Each still runs in a process of its own, but started from the
session's forkserver (``support.processes``), which imported SGLang once: the command's own
entry point runs there with its argv, environment and exit status, in a second or two.
``KARA_TEST_START_METHOD=spawn`` runs real subprocesses instead. A module runs all of its cases
at once, one per core, the first time one of its tests asks; only the cases of tests selected
to run are launched (``-m``/``-k`` deselection is respected).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time

from support import processes, startups


class _Subprocess:
    """A real subprocess (``KARA_TEST_START_METHOD=spawn``) with the forkserver process's face."""

    def __init__(self, argv, out_path, err_path):
        with open(out_path, "w") as out, open(err_path, "w") as err:
            self._proc = subprocess.Popen(argv, stdout=out, stderr=err, env=os.environ.copy(),
                                          start_new_session=True)

    @property
    def exitcode(self):
        return self._proc.poll()

    def kill(self):
        self._proc.kill()


def _start(argv, out_path, err_path, fork_children=False):
    if processes.START_METHOD == "forkserver":
        from support.engines import use_cpu_sglang

        use_cpu_sglang()  # the forkserver imports SGLang's CPU path (as every SGLang test here)
        startups.record(startups.launch_kind(argv) or "command line")
        return processes.start_command_line(argv, out_path, err_path, fork_children=fork_children)
    return _Subprocess(argv, out_path, err_path)  # counted by conftest's Popen wrapper


def run_all(commands: dict, timeout: float = 600, fork_children: bool = False) -> dict:
    """{key: argv} -> {key: CompletedProcess}, at most one process per core at a time. Output
    goes to files, not pipes: a pipe nobody reads while waiting fills up (``--help``) and
    blocks its writer. ``fork_children``: commands that run SGLang to the end (a server, a
    benchmark with its own engine), their scheduler and detokenizer forked from them
    (``support.processes``)."""
    results, pending, running = {}, list(commands.items()), {}
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory() as tmp:
        while pending or running:
            while pending and len(running) < (os.cpu_count() or 1):
                key, argv = pending.pop(0)
                n = len(results) + len(running)
                paths = [os.path.join(tmp, f"{n}.{name}") for name in ("out", "err")]
                running[key] = (argv, _start(argv, *paths, fork_children=fork_children), paths)
            for key, (argv, proc, paths) in list(running.items()):
                if proc.exitcode is not None:
                    out, err = (open(path).read() for path in paths)
                    results[key] = subprocess.CompletedProcess(argv, proc.exitcode, out, err)
                    del running[key]
            if time.monotonic() > deadline:
                for _, proc, _ in running.values():
                    proc.kill()
                raise AssertionError(f"command lines still running after {timeout} s: {sorted(running)}")
            time.sleep(0.2)
    return results


def selected_cases(request, cases: dict, key_of) -> dict:
    """The entries of ``cases`` whose tests in ``request``'s module were selected to run;
    ``key_of(item)`` names an item's case (None: not a command-line test)."""
    module = request.node.nodeid.split("::", 1)[0]
    keys = set()
    for item in request.session.items:
        if item.nodeid.split("::", 1)[0] == module:
            key = key_of(item)
            if key is not None:
                keys.add(key)
    return {key: argv for key, argv in cases.items() if key in keys}
