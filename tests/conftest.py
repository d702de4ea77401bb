"""Kernels run on Triton's CPU interpreter where there is no GPU (set before Triton loads)."""

import os
import sys

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/support helpers


def pytest_collection_modifyitems(config, items):
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
