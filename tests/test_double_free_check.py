"""Kara's debug double-free check sees both of SGLang's free lists: ``free_pages`` and
``release_pages`` (page-size-1 frees wait there, unsorted, when the allocator sorts), on a
real SGLang allocator."""

from types import SimpleNamespace

import pytest
import torch

from kara_sglang.adapter import KaraRuntime

sglang = pytest.importorskip("sglang")


def _allocator():
    try:
        from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    except ImportError:  # SGLang releases before the allocator package split
        from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
    return TokenToKVPoolAllocator(64, torch.float32, "cpu", kvcache=None, need_sort=True)


@pytest.mark.parametrize("where", ["free_pages", "release_pages"])
def test_freeing_a_slot_already_in_either_free_list_is_caught(where):
    allocator = _allocator()
    taken = allocator.alloc(10)
    runtime = SimpleNamespace(page_size=1)
    check = lambda slots: KaraRuntime._check_free(runtime, slots, allocator)  # noqa: E731
    check(taken[:4])  # allocated slots: fine
    allocator.free(taken[:4])  # need_sort: they wait in release_pages
    assert allocator.release_pages.numel() == 4
    if where == "free_pages":
        allocator.merge_and_sort_free()  # moves release_pages into free_pages
        assert allocator.release_pages.numel() == 0
    with pytest.raises(AssertionError, match=f"already free.*{where}"):
        check(taken[2:6])
    check(taken[4:])
