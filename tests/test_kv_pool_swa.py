"""Kara on SGLang's hybrid sliding-window KV pool, on real ``SWAKVPool`` and
``SWATokenToKVPoolAllocator`` objects (no engine).

A request's row is filled, SGLang's own window eviction (``free_swa_out_of_window_slots``)
releases the SWA peers of its old entries, Kara compresses a window (the real compressor),
SGLang evicts again on the compacted row, and the row is finally released by SGLang's own
segment free. After each stage every slot is counted: free in each allocator exactly once, or
held by the row (with an SWA peer exactly when SGLang's cursor says so). SGLang's invariant
checks (``SGLANG_INVARIANT_CHECK=2``, strict) are on, so a free of a released SWA peer fails.
"""

from types import SimpleNamespace

import pytest
import torch

from support.engines import use_cpu_sglang

pytestmark = pytest.mark.sglang

use_cpu_sglang()

FULL, SWA, HEADS, DIM = 96, 48, 2, 16
SWA_LAYERS, FULL_LAYERS = [0, 2, 4], [1, 3, 5]
SLIDING = 7  # ModelRunner.sliding_window_size: the SWA layers read the 7 + 1 newest entries


@pytest.fixture(autouse=True)
def strict_invariants(monkeypatch):
    from kara_sglang import swa_window

    if swa_window.missing():
        pytest.skip(f"this SGLang lacks the {swa_window.missing()}")
    monkeypatch.setenv("SGLANG_INVARIANT_CHECK", "2")  # STRICT


def swa_pool():
    from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
    from sglang.srt.mem_cache.swa_memory_pool import SWAKVPool

    pool = SWAKVPool(size=FULL, size_swa=SWA, page_size=1, dtype=torch.bfloat16, head_num=HEADS, head_dim=DIM,
                     swa_attention_layer_ids=SWA_LAYERS, full_attention_layer_ids=FULL_LAYERS, device="cpu",
                     enable_memory_saver=False)
    allocator = SWATokenToKVPoolAllocator(FULL, SWA, 1, torch.bfloat16, "cpu", pool, need_sort=True)
    return pool, allocator


def config(**changes):
    from kara_sglang.config import KaraConfig

    return KaraConfig(**{**dict(policy="kara", window=16, buffer=SLIDING + 1, keep_ratio=0.25, chunk_size=1),
                         **changes})


def test_kara_reads_only_the_full_attention_layers():
    from kara_sglang import kv_pool

    pool, _ = swa_pool()
    assert kv_pool.kind_of(pool) == "swa"
    assert kv_pool.shape_of(pool) == kv_pool.PoolShape("swa", len(FULL_LAYERS), HEADS, DIM)
    assert kv_pool.key_buffers(pool) is pool.full_kv_pool.k_buffer
    assert kv_pool.value_buffers(pool) is pool.full_kv_pool.v_buffer
    assert [kv_pool.layer_index(pool, layer) for layer in range(6)] == [None, 0, None, 1, None, 2]
    assert kv_pool.vote_layers(pool, config()) == (0, 1, 2)  # every full layer (3 < 4 voting layers)
    assert kv_pool.vote_layers(pool, config(num_vote_layers=1)) == (2,)  # the last one
    assert kv_pool.vote_layers(pool, config(vote_layers=(3, 5))) == (1, 2)  # model layers, by full index
    assert not kv_pool.values_in_keys(pool)


@pytest.mark.parametrize("changes, page_size, flag", [
    (dict(buffer=SLIDING), 1, "--kara-buffer"),  # the tail would not cover the sliding window
    (dict(), 16, "--page-size"),
    (dict(policy="streaming", budget=24), 1, "--kv-policy streaming"),
    (dict(vote_layers=(2,)), 1, "--kara-vote-layers: layer 2 is a sliding-window layer"),
    (dict(vote_layers=(9,)), 1, "--kara-vote-layers: layer 9 does not exist"),
])
def test_what_the_hybrid_pool_does_not_support_is_refused_with_one_line(changes, page_size, flag):
    from kara_sglang import kv_pool
    from kara_sglang.config import KaraConfigError

    pool, _ = swa_pool()
    kv_pool.check_supported(pool, config(), page_size=1, sliding_window=SLIDING)  # supported
    with pytest.raises(KaraConfigError, match=flag):
        kv_pool.check_supported(pool, config(**changes), page_size=page_size, sliding_window=SLIDING)


def test_with_no_buffer_flag_u_covers_the_sliding_window_and_a_given_one_is_kept():
    """``--kv-policy kara`` with no other flag on a hybrid SWA model: U follows the window."""
    from kara_sglang import kv_pool
    from kara_sglang.config import KaraConfigError

    pool, _ = swa_pool()
    default = config(buffer=2)  # below the window's SLIDING + 1 entries
    fitted = kv_pool.fit_buffer(pool, default, SLIDING, buffer_given=False)
    assert fitted.buffer == SLIDING + 1 and fitted.window == default.window
    kv_pool.check_supported(pool, fitted, page_size=1, sliding_window=SLIDING)  # now supported
    assert kv_pool.fit_buffer(pool, config(buffer=12), SLIDING, buffer_given=False).buffer == 12  # covers it
    given = kv_pool.fit_buffer(pool, default, SLIDING, buffer_given=True)
    assert given.buffer == 2  # a given U is checked, not changed:
    with pytest.raises(KaraConfigError, match="--kara-buffer"):
        kv_pool.check_supported(pool, given, page_size=1, sliding_window=SLIDING)
    with pytest.raises(KaraConfigError, match="--kara-window: W=8 must exceed the buffer U=8"):
        kv_pool.fit_buffer(pool, config(window=8, buffer=2), SLIDING, buffer_given=False)


def test_a_freed_slot_releases_its_swa_peer_only_if_sglang_has_not():
    from kara_sglang import kv_pool

    _, allocator = swa_pool()
    slots = allocator.alloc(10)
    if hasattr(allocator, "free_swa_segment"):  # out of the window: SGLang released them
        allocator.free_swa_segment(slots[:4], start_pos=0)
        assert allocator.swa_available_size() == SWA - 6
        with pytest.raises(RuntimeError, match="swa.peer_mapped"):  # what a plain free would do
            allocator.free(slots[:1])
    else:  # SGLang 0.5.17: free_swa releases them; its free skips released peers
        allocator.free_swa(slots[:4])
        assert allocator.swa_available_size() == SWA - 6
    kv_pool.free_slots(allocator, slots)  # strict invariants: no free of a released peer
    assert allocator.full_available_size() == FULL and allocator.swa_available_size() == SWA
    assert bool((allocator.full_to_swa_index_mapping[:-1] == 0).all())
    assert_free_lists_exact(allocator)


def assert_free_lists_exact(allocator, held_full=(), held_swa=()):
    """Each allocator's free slots are distinct, never slot 0, and exactly the ones not held."""
    for sub, size, held in ((allocator.full_attn_allocator, FULL, held_full),
                            (allocator.swa_attn_allocator, SWA, held_swa)):
        free = torch.cat([sub.free_pages, sub.release_pages]).tolist()
        assert len(free) == len(set(free)), "a slot is free twice"
        assert sorted(free) == sorted(set(range(1, size + 1)) - set(int(s) for s in held))


def test_compaction_keeps_the_swa_cursor_pool_counts_and_sglang_eviction_in_step():
    from sglang.srt.managers.schedule_batch import ReqKvInfo
    from sglang.srt.mem_cache import common

    from kara_sglang import kv_pool, req_kv, swa_window
    from kara_sglang.compressor import Compressor, DueRequest, KVLayout
    from kara_sglang.policies import make_policy
    from kara_sglang.query_buffer import QueryBuffer
    from kara_sglang.window import WindowState

    pool, allocator = swa_pool()
    cfg = config()
    policy = make_policy(cfg)
    prompt, decoded = 5, cfg.window + cfg.buffer
    n = prompt + decoded
    req_to_token = torch.zeros(2, 128, dtype=torch.int32)
    row = 1
    req_to_token[row, :n] = allocator.alloc(n).to(torch.int32)
    newer = hasattr(common, "free_kv_row_segments")  # 0.5.23; 0.5.17 keeps the lengths on the Req
    if newer:
        req = SimpleNamespace(kv=ReqKvInfo(req_pool_idx=row, cache_protected_len=prompt, kv_committed_len=n,
                                           kv_allocated_len=n), kara_offset=0)
        evict_kwargs = dict(supports_prefix_sharing=True)
    else:
        req = SimpleNamespace(kv=ReqKvInfo(kv_allocated_len=n, swa_evicted_seqlen=0), req_pool_idx=row,
                              cache_protected_len=prompt, kv_committed_len=n, kara_offset=0)
        evict_kwargs = {}
    req_to_token_pool = SimpleNamespace(req_to_token=req_to_token)

    def sglang_evicts(pre_len):  # ScheduleBatch._evict_swa (frontier = the newest written entry)
        common.free_swa_out_of_window_slots(req, pre_len, sliding_window_size=SLIDING, page_size=1,
                                            req_to_token_pool=req_to_token_pool,
                                            token_to_kv_pool_allocator=allocator, **evict_kwargs)

    def private_swa_tokens():  # SWA slots the request holds outside the tree's prefix
        if newer:
            from sglang.srt.managers.scheduler_components.pool_stats_observer import kv_private_swa_tokens

            return kv_private_swa_tokens(req.kv, 1)
        # 0.5.17's invariant checker: allocated - max(cache_protected_len, swa_evicted_seqlen)
        return req.kv.kv_allocated_len - max(req.cache_protected_len, swa_window.cursor(req))

    def check_row(length, running=True):
        cursor = swa_window.cursor(req)
        mapping = allocator.full_to_swa_index_mapping[req_to_token[row, :length].long()]
        dead_lo = swa_window.dead_lo(req)
        assert bool((mapping[dead_lo:cursor] == 0).all()) and bool((mapping[:dead_lo] > 0).all())
        assert bool((mapping[cursor:length] > 0).all())  # the window always holds its peers
        assert not running or cursor <= length - (SLIDING + 1)
        assert allocator.full_available_size() == FULL - length
        assert allocator.swa_available_size() == SWA - private_swa_tokens() - prompt
        assert_free_lists_exact(allocator, req_to_token[row, :length].tolist(),
                                [int(s) for s in mapping.tolist() if s > 0])

    lag = 3  # SGLang evicts lazily (SGLANG_SWA_EVICTION_INTERVAL, overlap): the cursor trails
    sglang_evicts(n - 1 - lag)
    assert swa_window.cursor(req) == n - 1 - lag - SLIDING
    check_row(n)

    state = WindowState(prompt_len=prompt)
    queries = QueryBuffer(2, kv_pool.vote_layers(pool, cfg), policy.query_ring, HEADS, HEADS, DIM, "group",
                          torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    for buf in kv_pool.key_buffers(pool):
        buf.copy_(torch.randn(buf.shape, generator=gen))
    for step in range(decoded):
        state.on_decode()
        for layer in queries.vote_layers:
            queries.capture(layer, torch.randn(1, HEADS, DIM, generator=gen), torch.tensor([row]),
                            torch.tensor([step % policy.query_ring]))
    task = policy.plan(state)
    assert task is not None and task.kv_start == prompt

    released = swa_window.release_region(req, allocator, req_to_token, row, task.kv_start + task.n_keys,
                                         task.kv_start)
    assert released == lag  # the region's last entries still had their peers
    layout = KVLayout(req_to_token, kv_pool.key_buffers(pool), kv_pool.value_buffers(pool), 1)
    freed = Compressor(policy, layout, queries, DIM ** -0.5).run([DueRequest(row, row, task, first=True)])
    assert freed.numel() == task.n_evicted
    kv_pool.free_slots(allocator, freed)
    req_kv.shorten(req, task.n_evicted)
    swa_window.shift(req, task.n_evicted)
    req.kara_offset = task.n_evicted
    length = n - task.n_evicted
    assert swa_window.cursor(req) == prompt + task.keep
    check_row(length)

    # More decode steps: SGLang's frontier is in token space, the patch takes it to the row's.
    more = 6
    req_to_token[row, length:length + more] = allocator.alloc(more).to(torch.int32)
    length += more
    req_kv.cut_to(req, length)
    sglang_evicts(swa_window.kv_frontier(req, n + more - 1))
    assert swa_window.cursor(req) == length - 1 - SLIDING
    check_row(length)

    # Release: Kara cuts the row to its exact prefix (here the prompt), SGLang frees the rest.
    cut = prompt + 2
    kv_pool.free_slots(allocator, req_to_token[row, cut:length].long())
    req_kv.cut_to(req, cut)
    swa_window.clamp(req, cut)
    check_row(cut, running=False)
    if newer:
        from sglang.srt.mem_cache.unified_cache.component_type import ComponentType

        common.free_kv_row_segments(allocator, [(req_to_token[row, :cut].long(), 0)],
                                    swa_evicted_seqlen=req.kv.get_evicted_seqlen(ComponentType.SWA),
                                    swa_dead_lo=req.kv.swa_dead_lo(1))
    else:  # 0.5.17 frees a row's full slots and the SWA peers they still have in one call
        allocator.free(req_to_token[row, :cut].long())
    assert allocator.full_available_size() == FULL and allocator.swa_available_size() == SWA
    assert_free_lists_exact(allocator)
