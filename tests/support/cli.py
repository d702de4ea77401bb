"""SGLang command lines that stop at start-up (bad flags, ``--help``), run side by side.

Each such run is one Python process importing SGLang (25-45 s of one core on a 2-core CI
machine) and nothing else, so a module runs all of its cases at once on every core, the
first time one of its tests asks, instead of one after another. Only the cases of tests
selected to run are launched (``-m``/``-k`` deselection is respected).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time


def run_all(commands: dict, timeout: float = 600) -> dict:
    """{key: argv} -> {key: CompletedProcess}, at most one process per core at a time. Output
    goes to files, not pipes: a pipe nobody reads while waiting fills up (``--help``) and
    blocks its writer."""
    results, pending, running = {}, list(commands.items()), {}
    deadline = time.monotonic() + timeout
    with tempfile.TemporaryDirectory() as tmp:
        while pending or running:
            while pending and len(running) < (os.cpu_count() or 1):
                key, argv = pending.pop(0)
                out, err = (open(os.path.join(tmp, f"{len(results) + len(running)}.{name}"), "w+")
                            for name in ("out", "err"))
                proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True, env=os.environ.copy(),
                                        start_new_session=True)
                running[key] = (argv, proc, out, err)
            for key, (argv, proc, out, err) in list(running.items()):
                if proc.poll() is not None:
                    out.seek(0), err.seek(0)
                    results[key] = subprocess.CompletedProcess(argv, proc.returncode, out.read(), err.read())
                    out.close(), err.close()
                    del running[key]
            if time.monotonic() > deadline:
                for _, proc, _, _ in running.values():
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
