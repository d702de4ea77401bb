"""Kernels run on Triton's CPU interpreter where there is no GPU (set before Triton loads)."""

import os
import sys

import pytest


def _share_the_cores_between_xdist_workers():
    """Each pytest-xdist worker (and every SGLang process it starts, which inherit the
    environment) gets its share of the cores for torch's OpenMP threads. Left alone, each
    engine's scheduler uses every core, and two workers' engines on 2 cores spin against each
    other: the fidelity test took 100 s alone and 600 s beside a second copy, 125 s with one
    thread each. Set before torch loads; an explicit OMP_NUM_THREADS is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))


_share_the_cores_between_xdist_workers()

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/support helpers

from support import startups  # noqa: E402  (needs the path above)


def _count_sglang_launches():
    """Wrap Popen so command-line SGLang start-ups are counted with the in-process ones."""
    import subprocess

    original = subprocess.Popen.__init__

    def init(self, args, *rest, **kwargs):
        kind = startups.launch_kind(args)
        if kind:
            startups.record(kind)
        original(self, args, *rest, **kwargs)

    subprocess.Popen.__init__ = init


_count_sglang_launches()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    startups.set_current(item.nodeid)  # module fixtures count against the first test using them
    return (yield)


def pytest_sessionfinish(session):
    engines = sys.modules.get("support.engines")
    if engines is not None:
        engines.shutdown_shared()
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # an xdist worker: its counts go to the controller
        workeroutput["sglang_startups"] = startups.export()


def pytest_configure(config):
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(_XdistStartups())
        # pytest-xdist's loadfile hands out files by their number of tests, most first, unless
        # told not to; the order below (by time) is the one that keeps the tail short.
        config.option.loadscopereorder = False


class _XdistStartups:
    """Under pytest-xdist the start-ups happen in the workers: merged here as each one ends."""

    @pytest.hookimpl
    def pytest_testnodedown(self, node, error):
        startups.merge(getattr(node, "workeroutput", {}).get("sglang_startups", []))


def pytest_terminal_summary(terminalreporter):
    for line in startups.summary():
        terminalreporter.write_line(line)


# The longest files (measured in CI's log, --durations), longest first: under pytest-xdist's
# loadfile each file runs whole on one worker, and a long file handed out last runs alone while
# the other core idles. The rest keep their order after these.
LONGEST_FIRST = [
    "test_recall.py", "test_sglang_stress.py", "test_sglang_sessions.py", "test_longflow.py", "test_bench_agent.py",
    "test_fidelity.py", "test_accuracy_cmd.py", "test_sglang_http.py", "test_examples.py", "test_cask.py",
    "test_follow_up.py", "test_sglang_session_continue.py", "test_sglang_engine.py", "test_sglang_layouts.py",
    "test_sglang_reasoning.py", "test_sglang_pd_decode.py", "test_fp8_kv.py", "test_sglang_parallel.py",
    "test_sglang_swa.py", "test_sglang_mla.py",
]


def _file_rank(item):
    name = os.path.basename(item.nodeid.split("::", 1)[0])
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)


def pytest_collection_modifyitems(config, items):
    items.sort(key=_file_rank)  # stable: each file's own order is kept
    if _HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    return "cuda" if _HAS_CUDA else "cpu"


@pytest.fixture(scope="session")
def tiny_qwen3_model(tmp_path_factory):
    """The tiny model in Qwen3's architecture (DP attention needs it in SGLang)."""
    from kara_sglang.demo_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_qwen3_model"), arch="qwen3")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Folder of a tiny random-weight Qwen2 model + tokenizer (SGLang tests).

    KARA_TEST_MODEL names another model folder instead: the FlashInfer run of the suites on a
    GPU uses SmolLM2 (head size 64, one FlashInfer is built for; the tiny model has 32)."""
    if os.environ.get("KARA_TEST_MODEL"):
        return os.environ["KARA_TEST_MODEL"]
    from kara_sglang.demo_model import build_tiny_model

    # KARA_TEST_HEAD_DIM=64: FlashAttention-3 (SGLang's default backend on Hopper) has no
    # kernels for the default head size of 32.
    head_dim = int(os.environ.get("KARA_TEST_HEAD_DIM", "32"))
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"), head_dim=head_dim)


@pytest.fixture(scope="session")
def kara_http_server(tiny_model, tmp_path_factory):
    """One real ``--kv-policy kara`` HTTP server (W 32, U 8, keep 25%, γ 2) for the whole session,
    shared by the tests that are its clients (a start-up through SGLang's command line costs
    about a minute on a 2-core CI machine). Streaming sessions on, four running requests;
    it sleeps while idle, so it costs nothing between its users. Yields (url, process, log)."""
    from support.engines import use_cpu_sglang
    from support.http_server import serve

    use_cpu_sglang()
    yield from serve(tiny_model, tmp_path_factory, extra=[
        "--enable-streaming-session", "--max-running-requests", "4", "--sleep-on-idle"])
