"""How test engines start and stop their SGLang processes.

SGLang's ``Engine`` starts its scheduler and detokenizer with the ``spawn`` start method: each
imports SGLang afresh, 25-45 s of CPU on a 2-core CI machine, and an engine start is nothing
else. Tests start them from a *forkserver* that imported SGLang's scheduler and detokenizer
modules once per test session, so an engine starts in a few seconds. The processes run the
same SGLang code (the forkserver only imported modules; it ran nothing): the current
environment is handed to each process and applied before SGLang's entry point runs, as a
spawned process would inherit it. Command lines that stop at start-up (bad flags, ``--help``)
run the same way (:func:`start_command_line`): SGLang's entry point as ``python -m`` or its
console script would run it, in a process of its own, with the imports already done.
HTTP servers start the same way, their own scheduler and detokenizer forked from them (no
third import). ``KARA_TEST_START_METHOD=spawn`` restores SGLang's own start method and real
subprocesses for command lines and servers.

``Engine.shutdown()`` kills every process below the test process (``kill_process_tree`` of
its own pid), which would end the forkserver, a session's shared engines and HTTP servers.
:func:`scope_shutdown` makes an engine's shutdown end only the processes it started.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import runpy
import sys

START_METHOD = os.environ.get("KARA_TEST_START_METHOD", "forkserver")
PRELOAD = ["sglang.srt.managers.scheduler", "sglang.srt.managers.detokenizer_manager"]


def _forkserver_context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the forkserver starts (once per session)
    return ctx


def _run_with_environ(environ: dict, path: list, target, args, kwargs):
    """Entry point of a forkserver child: the parent's environment and import path as they are
    now (a spawned child would start with both: a test may add a plugin's folder to each),
    then SGLang's target."""
    os.environ.clear()
    os.environ.update(environ)
    sys.path[:] = path
    return target(*args, **kwargs)


def _run_command_line(environ: dict, path: list, argv: list, out_path: str, err_path: str,
                      fork_children: bool = False):
    """Entry point of a forkserver child running an SGLang command line: ``python -m
    sglang.launch_server ...`` runs the module as ``__main__`` (as ``-m`` does), the ``sglang``
    console script runs the function its script calls, ``python script.py ...`` runs the
    script as ``__main__`` with its folder first on the path; stdout and stderr go to files (as a
    subprocess's would go to pipes), and the exit status is the command's own (argparse's
    ``SystemExit(2)`` becomes the process's exit code 2).

    ``fork_children`` (a server that keeps running): the process leads a session of its own,
    so the test can end it and everything it started with one ``killpg``, as it would a
    ``start_new_session`` subprocess; and SGLang's scheduler and detokenizer are forked from it
    instead of spawned, so they do not import SGLang again. The fork happens where SGLang
    would spawn them, before the server starts any thread of its own (its tokenizer manager
    and HTTP loop come after), and the child runs SGLang's own process entry point."""
    if fork_children:
        os.setsid()
    for fd, file_path in ((1, out_path), (2, err_path)):
        if fd == 2 and err_path == out_path:
            os.dup2(1, 2)  # one log, as stderr=STDOUT
            break
        target = os.open(file_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    os.environ.clear()
    os.environ.update(environ)
    sys.path[:] = path
    if fork_children:
        from sglang.srt.entrypoints import engine as engine_module

        engine_module.mp = _RecordingMultiprocessing(multiprocessing.get_context("fork"), forkserver=False)
    if argv[1:3] == ["-m", "sglang.launch_server"]:
        sys.argv = [argv[0]] + list(argv[3:])
        runpy.run_module("sglang.launch_server", run_name="__main__", alter_sys=True)
    elif os.path.basename(argv[0]) == "sglang":
        from sglang.cli.main import main

        sys.argv = list(argv)
        sys.exit(main())
    elif argv[1].endswith(".py"):  # a repo script that starts SGLang itself (a benchmark)
        sys.argv = list(argv[1:])
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[1])))  # as `python script.py` does
        runpy.run_path(argv[1], run_name="__main__")
    else:
        raise ValueError(f"not an SGLang command line: {argv}")


def start_command_line(argv: list, out_path: str, err_path: str, env: dict | None = None,
                       fork_children: bool = False):
    """Start an SGLang command line (``[python, -m, sglang.launch_server, ...]`` or
    ``[.../sglang, serve, ...]``) from the forkserver, with ``env`` added to the current
    environment; a started ``multiprocessing`` process. ``fork_children``: a server (see
    :func:`_run_command_line`)."""
    environ = dict(os.environ, **(env or {}))
    proc = _forkserver_context().Process(target=_run_command_line,
                                         args=(environ, list(sys.path), list(argv), out_path, err_path, fork_children))
    proc.start()
    return proc


class _RecordingMultiprocessing:
    """Stands in for the ``multiprocessing`` module inside SGLang's engine module while one
    engine starts: processes come from ``ctx`` and are recorded; SGLang's own
    ``set_start_method("spawn")`` call is left out (it would reset the global default)."""

    def __init__(self, ctx, forkserver: bool):
        self._ctx, self._forkserver, self.started = ctx, forkserver, []

    def __getattr__(self, name):
        return getattr(self._ctx, name)

    def set_start_method(self, *args, **kwargs):
        pass

    def Process(self, group=None, target=None, name=None, args=(), kwargs=None, **rest):
        if self._forkserver:
            target, args = _run_with_environ, (dict(os.environ), list(sys.path), target, tuple(args), dict(kwargs or {}))
            kwargs = {}
        proc = self._ctx.Process(group=group, target=target, name=name, args=args, kwargs=kwargs or {}, **rest)
        self.started.append(proc)
        return proc


@contextlib.contextmanager
def recording(use_forkserver: bool):
    """While an engine starts: its processes are recorded, and come from the forkserver when
    ``use_forkserver``."""
    from sglang.srt.entrypoints import engine as engine_module

    forkserver = use_forkserver and START_METHOD == "forkserver"
    ctx = _forkserver_context() if forkserver else multiprocessing.get_context("spawn")
    stand_in = _RecordingMultiprocessing(ctx, forkserver)
    original = engine_module.mp
    engine_module.mp = stand_in
    try:
        yield stand_in.started
    finally:
        engine_module.mp = original


def scope_shutdown(engine, started) -> None:
    """Make ``engine.shutdown()`` end only ``started`` (and their children)."""
    from sglang.srt.entrypoints import engine as engine_module

    pids = [proc.pid for proc in started]
    shutdown = engine.shutdown

    def own_shutdown():
        original = engine_module.kill_process_tree

        def kill_own(parent_pid, include_parent=True, skip_pid=None, wait_timeout=60):
            for pid in pids:
                original(pid, include_parent=True, wait_timeout=wait_timeout)

        engine_module.kill_process_tree = kill_own
        try:
            shutdown()
        finally:
            engine_module.kill_process_tree = original

    engine.shutdown = own_shutdown
