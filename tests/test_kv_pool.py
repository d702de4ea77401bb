"""Kara's handling of SGLang's MLA KV pool, on a real ``MLATokenToKVPool`` object (no engine).

The expected keep set is computed here in float64 from the raw draws (the absorbed queries of
every head, their group mean, the latent rows), and the compaction is checked row by row
against a copy of the pool taken before it.
"""

import random

import pytest
import torch

from support.engines import use_cpu_sglang

pytestmark = pytest.mark.sglang

use_cpu_sglang()

KV_LORA, ROPE, LAYERS, Q_HEADS, PAGE = 64, 16, 2, 4, 4


def mla_pool(dtype=torch.bfloat16, size=256):
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

    return MLATokenToKVPool(size, page_size=PAGE, dtype=dtype, kv_lora_rank=KV_LORA, qk_rope_head_dim=ROPE,
                            layer_num=LAYERS, device="cpu", enable_memory_saver=False)


def test_an_mla_layer_is_one_latent_kv_head_whose_values_are_views_of_its_rows():
    from kara_sglang import kv_pool

    pool = mla_pool()
    assert kv_pool.shape_of(pool) == kv_pool.PoolShape("mla", LAYERS, 1, KV_LORA + ROPE)
    assert kv_pool.key_buffers(pool) is pool.kv_buffer
    for layer, v in enumerate(kv_pool.value_buffers(pool)):
        sglang_v = pool.get_value_buffer(layer)
        assert v.shape == sglang_v.shape == (pool.size + PAGE, 1, KV_LORA)
        assert v.data_ptr() == sglang_v.data_ptr() == pool.kv_buffer[layer].data_ptr()
    assert kv_pool.values_in_keys(pool)


def test_split_rope_queries_are_appended_in_the_latent_rows_order():
    from kara_sglang.kv_pool import latent_query

    q_nope, q_rope = torch.randn(3, Q_HEADS * KV_LORA), torch.randn(3, Q_HEADS, ROPE)
    q = latent_query(q_nope, q_rope, Q_HEADS)
    assert q.shape == (3, Q_HEADS, KV_LORA + ROPE)
    assert torch.equal(q[..., :KV_LORA], q_nope.view(3, Q_HEADS, KV_LORA)) and torch.equal(q[..., KV_LORA:], q_rope)
    whole = torch.randn(3, Q_HEADS, KV_LORA + ROPE)
    assert latent_query(whole, None, Q_HEADS) is whole  # backends that pass the concatenation


@pytest.mark.parametrize("settings, flag", [
    (dict(policy="longflow", budget=24, buffer=8), "--kv-policy longflow"),
    (dict(policy="kara", recall_tokens=8), "--kara-recall-tokens"),
])
def test_what_mla_does_not_support_is_refused_with_one_line(settings, flag):
    from kara_sglang import kv_pool
    from kara_sglang.config import KaraConfig, KaraConfigError

    pool = mla_pool()
    kv_pool.check_supported(pool, KaraConfig(policy="kara"))  # supported
    with pytest.raises(KaraConfigError, match=flag):
        kv_pool.check_supported(pool, KaraConfig(**settings))
    with pytest.raises(KaraConfigError, match="--kv-cache-dtype"):
        kv_pool.check_supported(mla_pool(torch.float8_e4m3fn), KaraConfig(policy="kara"))


def test_other_mla_pool_kinds_are_refused():
    from sglang.srt.mem_cache.memory_pool import MLATokenToKVPool

    from kara_sglang import kv_pool
    from kara_sglang.config import KaraConfig, KaraConfigError

    class LaidOutOtherwise(MLATokenToKVPool):  # DSA, FP4, page-interleaved pools are subclasses
        pass

    pool = LaidOutOtherwise(64, page_size=PAGE, dtype=torch.bfloat16, kv_lora_rank=KV_LORA, qk_rope_head_dim=ROPE,
                            layer_num=LAYERS, device="cpu", enable_memory_saver=False)
    with pytest.raises(KaraConfigError, match="LaidOutOtherwise"):
        kv_pool.check_supported(pool, KaraConfig(policy="kara"))


def test_a_paged_compression_scores_the_latent_and_moves_latent_rows():
    """One window of a request in a page-4 MLA pool: the float64 top-k of the absorbed queries'
    softmax over the latent rows survives, every layer's latent rows slide left into place
    (values with them), and exactly the whole pages past the new end are returned."""
    from kara_sglang import kv_pool
    from kara_sglang.compressor import Compressor, DueRequest, KVLayout
    from kara_sglang.config import KaraConfig
    from kara_sglang.policies import make_policy
    from kara_sglang.query_buffer import QueryBuffer
    from kara_sglang.window import WindowState

    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    pool = mla_pool()
    for buf in pool.kv_buffer:
        buf.copy_(torch.randn(buf.shape, generator=gen) * 2)
    config = KaraConfig(policy="kara", window=16, buffer=4, keep_ratio=0.25, chunk_size=1)
    policy = make_policy(config)
    prompt, decoded = 5, 20
    n = prompt + decoded
    req_to_token = torch.zeros(2, 64, dtype=torch.int32)
    req_to_token[1, :n] = torch.arange(PAGE, PAGE + n, dtype=torch.int32)  # pages 1.. of row 1
    queries = QueryBuffer(2, (0, 1), policy.query_ring, Q_HEADS, 1, KV_LORA + ROPE, "group", torch.bfloat16)
    raw = {0: [], 1: []}
    state = WindowState(prompt_len=prompt)
    for step in range(decoded):
        state.on_decode()
        for layer in (0, 1):
            q_nope, q_rope = torch.randn(1, Q_HEADS * KV_LORA, generator=gen), torch.randn(1, Q_HEADS, ROPE, generator=gen)
            latent = kv_pool.latent_query(q_nope, q_rope, Q_HEADS)
            raw[layer].append(latent[0])
            queries.capture(layer, latent, torch.tensor([1]), torch.tensor([step % policy.query_ring]))
    task = policy.plan(state)
    assert task is not None and task.kv_start == prompt and task.n_keys == 16, f"seed {seed}"

    scale = 0.6 * (KV_LORA + ROPE) ** -0.5  # as attn_mqa.scaling with YaRN's mscale
    slots = req_to_token[1, task.kv_start: task.kv_start + task.n_keys].long()
    scores = torch.zeros(task.n_keys, dtype=torch.float64)
    for layer in (0, 1):
        # [nq, D]: the group's mean query, stored in the pool's dtype as the ring stores it
        q = torch.stack(raw[layer][-task.n_queries:]).mean(dim=1).to(torch.bfloat16).double()
        k = pool.kv_buffer[layer][slots, 0].double()  # [n_keys, D]: latent rows
        scores += (q @ k.T * scale).softmax(dim=-1).sum(dim=0)
    keep = sorted(scores.topk(task.keep).indices.tolist())

    before = [buf.clone() for buf in pool.kv_buffer]
    layout = KVLayout(req_to_token, kv_pool.key_buffers(pool), kv_pool.value_buffers(pool), PAGE,
                      values_in_keys=kv_pool.values_in_keys(pool))
    freed = Compressor(policy, layout, queries, scale).run([DueRequest(1, 1, task, first=True)])

    old_slots = torch.arange(PAGE, PAGE + n)
    survivors = list(range(task.kv_start)) + [task.kv_start + j for j in keep] + list(
        range(task.kv_start + task.n_keys, n))
    assert torch.equal(req_to_token[1, :n], old_slots.to(torch.int32)), f"seed {seed}"  # paged: slots stay
    for layer in range(LAYERS):
        for column, position in enumerate(survivors):
            assert torch.equal(pool.kv_buffer[layer][old_slots[column]], before[layer][old_slots[position]]), \
                f"seed {seed}, layer {layer}, column {column}"
        new_rows = old_slots[: len(survivors)]
        assert torch.equal(pool.get_value_buffer(layer)[new_rows], before[layer][old_slots[survivors]][..., :KV_LORA])
    new_end = len(survivors)
    first_free = -(-new_end // PAGE) * PAGE
    assert sorted(freed.tolist()) == old_slots[first_free:n].tolist(), f"seed {seed}"
