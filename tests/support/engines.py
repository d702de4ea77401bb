"""Real SGLang on the CPU for tests: environment, engines, and pool accounting helpers."""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import sys
from pathlib import Path

STANDIN = str(Path(__file__).parent / "sgl_kernel_standin")

# What every SGLang test process (and the scheduler processes it spawns) runs under.
TEST_ENV = {
    "SGLANG_USE_CPU_ENGINE": "1",
    "TRITON_INTERPRET": "1",  # Kara's Triton kernels on the CPU
    "SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_BUSY": "1",  # SGLang's own leak check, every step
    "SGLANG_CHECK_KV_PAGE_INVARIANTS": "1",  # ... and its owned-vs-free page check
    # SGLang's value/index invariants, strict (crash on a violation); in the releases tested
    # its allocators for hybrid sliding-window pools are what register such checks.
    "SGLANG_INVARIANT_CHECK": "2",
    "KARA_DEBUG_CHECKS": "1",  # no slot freed twice or while free
}


# KARA_TEST_DEVICE=cuda runs the same engine suites on GPUs (benchmarks/gpu/run_tp.sh):
# real sgl_kernel, CUDA graphs, NCCL; only SGLang's and Kara's strict checks are kept.
ON_GPU = os.environ.get("KARA_TEST_DEVICE", "cpu") == "cuda"


def use_cpu_sglang() -> None:
    """Make ``import sglang`` work here and in spawned schedulers (call before importing it)."""
    if ON_GPU:
        os.environ.update({k: v for k, v in TEST_ENV.items()
                           if k not in ("SGLANG_USE_CPU_ENGINE", "TRITON_INTERPRET")})
        return
    os.environ.update(TEST_ENV)
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if STANDIN not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([STANDIN] + [p for p in paths if p])
    if STANDIN not in sys.path:
        sys.path.insert(0, STANDIN)


ENGINE_DEFAULTS = dict(
    device="cpu", attention_backend="torch_native", disable_cuda_graph=True,
    disable_overlap_schedule=True, max_total_tokens=20000, mem_fraction_static=0.3,
    skip_server_warmup=True, log_level="error", random_seed=0,
)
# SGLang's overlap scheduler is on, as by default (vanilla and Kara alike: Kara then compresses
# with the next step already prepared); KARA_TEST_OVERLAP=0 runs the same suites without it.
OVERLAP = os.environ.get("KARA_TEST_OVERLAP", "1") not in ("", "0")
ENGINE_DEFAULTS["disable_overlap_schedule"] = not OVERLAP
if ON_GPU:
    # KARA_TEST_ATTENTION_BACKEND=flashinfer runs the suites on FlashInfer's paged attention;
    # =default leaves the choice to SGLang (fa3 on Hopper).
    ENGINE_DEFAULTS.update(device="cuda", disable_cuda_graph=False,
                           attention_backend=os.environ.get("KARA_TEST_ATTENTION_BACKEND", "triton"))
    if ENGINE_DEFAULTS["attention_backend"] == "default":
        del ENGINE_DEFAULTS["attention_backend"]
# KARA_TEST_KV_DTYPE=fp8_e4m3 runs the suites on an FP8 KV cache (vanilla and Kara alike).
if os.environ.get("KARA_TEST_KV_DTYPE"):
    ENGINE_DEFAULTS["kv_cache_dtype"] = os.environ["KARA_TEST_KV_DTYPE"]


def parallel_env(tp_size: int, dp_size: int = 1) -> dict:
    """What SGLang's CPU path needs for ``--tp-size``/``--dp-size`` > 1 on this machine.

    - ``SGLANG_NCCL_SO_PATH`` nowhere: the CUDA build of torch installed here finds NCCL, and
      SGLang's pynccl then asks for a CUDA device (``Expected a cuda device, but got: cpu``).
      Without a loadable NCCL it falls back to gloo, as on a CPU-only install.
    - ``SGLANG_CPU_OMP_THREADS_BIND``: without it SGLang wants one NUMA node per rank (this
      machine has one); with it, one core list per rank ("all" = unset). SGLang 0.5.17 counts
      the TP ranks of one scheduler group; later releases count every rank of every DP worker.
    """
    from kara_sglang.sglang_versions import installed

    ranks = tp_size if installed() == "0.5.17" else tp_size * dp_size
    cores = os.cpu_count() or 1
    bind = "|".join(str(r % cores) for r in range(ranks)) if ranks > 1 else "all"
    return {"SGLANG_NCCL_SO_PATH": "/nonexistent/libnccl.so.2", "SGLANG_CPU_OMP_THREADS_BIND": bind}


# DP attention derives its ZMQ and NCCL ports from ``port`` (default 30000) instead of picking
# free ones, so two live DP-attention engines (a vanilla and a Kara one) would collide.
_DP_ATTENTION_PORTS = itertools.count(31000, 1000)


def make_engine(model_path, **overrides):
    """A real ``sglang.Engine`` whose ``shutdown()`` ends only its own processes (see
    :mod:`support.processes`): shared engines and HTTP servers of the session live on."""
    import sglang

    from support import processes, startups

    startups.record("engine")

    kwargs = dict(ENGINE_DEFAULTS, model_path=str(model_path))
    kwargs.update(overrides)
    if kwargs.get("enable_dp_attention"):
        kwargs.setdefault("port", next(_DP_ATTENTION_PORTS))
    env = {}
    parallel = kwargs.get("tp_size", 1) > 1 or kwargs.get("dp_size", 1) > 1
    if not ON_GPU and parallel:
        env = parallel_env(kwargs.get("tp_size", 1), kwargs.get("dp_size", 1))
    with scoped_environ(env):  # read by the schedulers the engine spawns, and only by them
        with processes.recording(use_forkserver=not ON_GPU and not parallel) as started:
            engine = sglang.Engine(**kwargs)
    processes.scope_shutdown(engine, started)
    return engine


# Engines shared by every test asking for the same configuration (shared_engine), the
# most recently used first; older ones are shut down past MAX_SHARED (memory: ~1.5 GB each).
_SHARED: "collections.OrderedDict" = collections.OrderedDict()
MAX_SHARED = 3


def shared_engine(model_path, **overrides):
    """A live engine of this configuration, started by the first test that asks and handed to
    every later one; it sleeps while idle (``sleep_on_idle``), so kept engines cost no CPU.

    Tests stay independent: each user gets it with the radix tree flushed and the pool
    checked idle (every slot free: what the previous user held was released), and must not
    shut it down. Counters (compression events) are the engine's since its start: read
    differences."""
    key = (str(model_path), tuple(sorted((k, repr(v)) for k, v in overrides.items())))
    engine = _SHARED.pop(key, None)
    if engine is None:
        while len(_SHARED) >= MAX_SHARED:
            _SHARED.popitem(last=False)[1].shutdown()
        engine = make_engine(model_path, sleep_on_idle=True, **overrides)
    _SHARED[key] = engine
    assert_pool_back_to_idle(engine)
    return engine


def shutdown_shared() -> None:
    while _SHARED:
        _SHARED.popitem(last=False)[1].shutdown()


@contextlib.contextmanager
def scoped_environ(updates: dict):
    """Set ``updates`` in os.environ, then restore it. A TP layout's one-core-list-per-rank
    binding left behind made the next single-rank engine's scheduler fail at start-up (and
    SGLang then kills the test process: ``pytest -m slow`` died with exit 137 at the stress
    test after the parallel suite)."""
    saved = {key: os.environ.get(key) for key in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def pool_states(engine) -> list:
    """The pool accounting the Kara plugin adds to ``/server_info``: one per DP replica."""
    return [s["kara"] for s in engine.get_server_info()["internal_states"]]


def pool_state(engine) -> dict:
    """The accounting summed over DP replicas (one replica: its own)."""
    states = pool_states(engine)
    total = dict(states[0])
    for state in states[1:]:
        for key, value in state.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("tp_size", "dp_rank"):
                total[key] += value
    return total


def assert_pool_consistent(engine) -> dict:
    """In every replica, every slot is free, owned by the radix tree or held by an open streaming
    session between its turns (the server is idle)."""
    for state in pool_states(engine):
        owned = (state["available_tokens"] + state["evictable_tokens"] + state["protected_tokens"]
                 + state.get("session_held_tokens", 0))
        assert owned == state["max_total_tokens"], state
    return pool_state(engine)


def assert_pool_back_to_idle(engine) -> None:
    """After flushing the tree, the allocator's free count is exactly the pool size again."""
    flush(engine)
    for state in pool_states(engine):
        assert state["available_tokens"] == state["max_total_tokens"], state
        assert state["evictable_tokens"] == 0 and state["protected_tokens"] == 0, state
        assert state.get("session_held_tokens", 0) == 0, state


def flush(engine, attempts: int = 50) -> None:
    """Flush the radix cache; SGLang refuses while the scheduler still finishes a batch."""
    import time

    for _ in range(attempts):
        if engine.flush_cache().success:
            return
        time.sleep(0.1)
    raise AssertionError("flush_cache kept failing: the scheduler never went idle")


def last(meta: dict, key: str):
    value = meta[key]
    return value[-1] if isinstance(value, list) else value


async def tally_outcome(task, results: dict) -> None:
    """Await one ``async_generate`` task and count it in ``results``: ``aborted`` (an aborted
    request raises its abort message, or finishes with reason ``abort``), else ``done`` and
    the tokens it ``evicted``."""
    try:
        out = await task
    except ValueError:
        results["aborted"] += 1
        return
    if out["meta_info"]["finish_reason"]["type"] == "abort":
        results["aborted"] += 1
        return
    results["done"] += 1
    if "kv_tokens_evicted" in out["meta_info"]:
        results["evicted"] += last(out["meta_info"], "kv_tokens_evicted")
