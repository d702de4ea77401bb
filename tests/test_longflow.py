"""LongFlow: the fused decode-attention / importance kernel (against float64 and against SGLang's
own decode attention), the eviction kernel, the policy's schedule, whole compressions on the
toy pool, and real SGLang."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kara_kernels import evict_lowest, evict_lowest_reference, longflow_decode, longflow_decode_reference
from kara_kernels._buffers import interpreting

# The kernels run where the tests run: on a GPU when there is one (bf16 included), else on
# Triton's CPU interpreter. Inputs are drawn on the CPU (seeded generator), then moved.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def paged_rows(gen, lens, page_size, num_pages, max_context):
    """``req_to_token`` rows of a paged allocator: fresh pages, ``slot % P == position % P``."""
    pages = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()  # page 0 reserved
    rows = torch.zeros(len(lens), max_context, dtype=torch.int32)
    for b, n in enumerate(lens):
        for pos in range(n):
            if pos % page_size == 0:
                page = pages.pop()
            rows[b, pos] = page * page_size + pos % page_size
    return rows


def random_decode_inputs(gen, lens, q_heads, kv_heads, head_dim, n_vote, dtype, page_size):
    max_context = max(lens) + page_size
    num_pages = sum(-(-n // page_size) for n in lens) + 5
    num_slots = num_pages * page_size
    k = [(torch.randn(num_slots, kv_heads, head_dim, generator=gen) * 2).to(dtype) for _ in range(n_vote)]
    v = [torch.randn(num_slots, kv_heads, head_dim, generator=gen).to(dtype) for _ in range(n_vote)]
    req_to_token = paged_rows(gen, lens, page_size, num_pages, max_context)
    extra_rows = 2  # requests sit at scattered rows of both tables
    queries = (torch.randn(len(lens) + extra_rows, n_vote, q_heads, head_dim, generator=gen) * 2).to(dtype)
    query_rows = torch.randperm(len(lens) + extra_rows, generator=gen)[: len(lens)]
    req_to_token = torch.cat([torch.zeros(extra_rows, max_context, dtype=torch.int32), req_to_token])
    pool_rows = torch.arange(extra_rows, extra_rows + len(lens))
    return tuple(x.to(DEVICE) if torch.is_tensor(x) else [t.to(DEVICE) for t in x]
                 for x in (queries, query_rows, k, v, req_to_token, pool_rows, torch.tensor(lens)))


DECODE_CASES = [
    # (q_heads, kv_heads, head_dim, n_vote, lens)
    (4, 4, 32, 1, [1, 37, 70]),      # GQA 1, a one-token request
    (8, 4, 32, 2, [64, 5, 129]),     # GQA 2, two voting layers
    (8, 2, 64, 1, [100, 17]),        # GQA 4
    (16, 2, 16, 2, [33, 80, 2]),     # GQA 8
    (6, 2, 48, 1, [50, 9]),          # GQA 3, head_dim not a power of two
]


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", DECODE_CASES)
def test_longflow_decode_matches_float64_reference(case, dtype, page_size):
    q_heads, kv_heads, head_dim, n_vote, lens = case
    seed = 42
    gen = torch.Generator().manual_seed(seed)
    inputs = random_decode_inputs(gen, lens, q_heads, kv_heads, head_dim, n_vote, dtype, page_size)
    # Score a ragged region of each request: from a random start to the end of its KV.
    starts = torch.tensor([int(torch.randint(0, n, (1,), generator=gen)) for n in lens], device=DEVICE)
    n_scores = int((torch.tensor(lens) - starts.cpu()).min())
    scale = head_dim ** -0.5
    out, imp = longflow_decode(*inputs, scale, score_start=starts, n_scores=n_scores, block_n=16)
    ref_out, ref_imp = longflow_decode_reference(*inputs, scale, score_start=starts, n_scores=n_scores)
    assert out.dtype == imp.dtype == torch.float32, f"seed {seed}"
    assert out.shape == (len(lens), n_vote, q_heads, head_dim) and imp.shape == (len(lens), n_scores), f"seed {seed}"
    # float32 arithmetic on the same (rounded) inputs as the float64 reference.
    assert torch.allclose(out.double(), ref_out, rtol=1e-5, atol=1e-5), f"seed {seed}"
    assert torch.allclose(imp.double(), ref_imp, rtol=1e-4, atol=1e-6), f"seed {seed}"
    # Without the output the importance is the same (pass 1 then only reads K).
    none, imp_only = longflow_decode(*inputs, scale, score_start=starts, n_scores=n_scores,
                                     with_output=False, block_n=32)
    assert none is None and torch.allclose(imp_only, imp, rtol=1e-5, atol=1e-7), f"seed {seed}"


def test_importance_of_the_whole_kv_sums_to_the_value_norms():
    # sum_j p_j |v_j|_1 = sum_j p_j * c when every value row has L1 norm c: = c per head.
    seed = 43
    gen = torch.Generator().manual_seed(seed)
    q, rows, k, v, rtt, pool_rows, lens = random_decode_inputs(gen, [23, 40], 8, 2, 32, 2,
                                                               torch.float32, 1)
    v = [torch.full_like(b, 0.5) * torch.sign(torch.randn(b.shape, generator=gen)).to(DEVICE) for b in v]
    _, imp = longflow_decode(q, rows, k, v, rtt, pool_rows, torch.tensor([23, 23], device=DEVICE), 0.2,
                             n_scores=23)
    expected = 2 * 8 * 0.5 * 32  # layers x heads x |v|_1
    assert torch.allclose(imp.sum(dim=1).cpu(), torch.full((2,), float(expected)), rtol=1e-5), f"seed {seed}"


SGL_CASES = [(4, 4, 32, [1, 37, 70]), (8, 2, 64, [100, 17, 64]), (16, 2, 16, [33, 80]), (8, 1, 32, [45, 3])]


def sglang_decode_attention(q, k, v, req_to_token, pool_rows, lens, scale, page_size, max_splits=4):
    """SGLang's own Triton decode attention (what its triton backend runs), on the same KV."""
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

    n, heads, head_dim = q.shape
    dev = q.device
    kv_indptr = torch.zeros(n + 1, dtype=torch.int32, device=dev)
    kv_indptr[1:] = lens.cumsum(0)
    kv_indices = torch.cat([req_to_token[int(r), : int(l)] for r, l in zip(pool_rows, lens)]).long()
    out = torch.zeros(n, heads, head_dim, dtype=q.dtype, device=dev)
    logits = torch.empty(n, heads, max_splits, head_dim, dtype=torch.float32, device=dev)
    lse = torch.empty(n, heads, max_splits, dtype=torch.float32, device=dev)
    splits = torch.randint(1, max_splits + 1, (n,), dtype=torch.int32).to(dev)  # split-KV as on the GPU
    decode_attention_fwd(q, k, v, out, kv_indptr, kv_indices, logits, lse, splits, max_splits,
                         scale, 1.0, 1.0, page_size=page_size)
    return out


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("dtype", [
    torch.float32, torch.float16,
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
        interpreting(), reason="SGLang's decode kernel needs bf16, which Triton 3.6's interpreter lacks")),
])
@pytest.mark.parametrize("case", SGL_CASES)
@pytest.mark.sglang  # imports SGLang's own decode kernel
def test_attention_output_equals_sglang_decode_attention(case, dtype, page_size):
    """The exactness check: our output against SGLang's ``decode_attention_fwd``.

    Both read the same KV rows by slot and use the same softmax; they differ only in rounding.
    Ours multiplies and accumulates in float32 (within 1e-5 of float64: the test above).
    SGLang multiplies ``q`` and ``k`` in the KV dtype, so each product is rounded (relative
    ``eps/2``) and a logit may be off by ``delta <= eps/2 * scale * sum_i |q_i k_i|``; that
    scales each probability by at most ``exp(+-delta)`` and moves the output by at most
    ``(exp(2 delta) - 1) * max|v|``; its output is then rounded to the KV dtype (``eps/2 * |o|``).
    The tolerance is that bound, per request and head, plus 2e-6 of float32 accumulation-order
    noise (SGLang sums per KV split, then merges the splits). For float32 KV the bound is about
    1e-5, and the outputs agree to 1e-5 (measured: up to 3.3e-6 on these inputs, logits up to
    about 20, which the exponential turns into relative errors of about 20 float32 eps).
    """
    q_heads, kv_heads, head_dim, lens = case
    seed = 44
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    q, rows, k, v, rtt, pool_rows, kv_lens = random_decode_inputs(gen, lens, q_heads, kv_heads, head_dim, 1,
                                                                  dtype, page_size)
    scale = head_dim ** -0.5
    ours, _ = longflow_decode(q, rows, k, v, rtt, pool_rows, kv_lens, scale)
    theirs = sglang_decode_attention(q[rows.long(), 0].contiguous(), k[0], v[0], rtt, pool_rows, kv_lens,
                                     scale, page_size)
    eps = torch.finfo(dtype).eps
    group = q_heads // kv_heads
    # On a GPU, SGLang's grouped kernel (GQA > 1) multiplies float32 q.k and p.v with tl.dot,
    # i.e. in TF32 (10 mantissa bits): the rounding bound is TF32's, and p.v adds its own
    # rounding of p and v (eps per product, at most eps * max|v| on the output). Measured on
    # an H100: differences up to 4.2e-3 for float32 with GQA 4-8, none for GQA 1.
    tf32 = DEVICE == "cuda" and dtype == torch.float32 and group > 1
    if tf32:
        eps = 2.0 ** -10
    for b, (row, n) in enumerate(zip(pool_rows.tolist(), lens)):
        slots = rtt[row, :n].long()
        qb = q[int(rows[b]), 0].double()  # [H, D]
        kb = k[0][slots].double().repeat_interleave(group, dim=1)  # [N, H, D]
        vb = v[0][slots].double().repeat_interleave(group, dim=1)
        delta = eps / 2 * scale * (qb.abs()[None] * kb.abs()).sum(-1).amax(0)  # [H]
        bound = (torch.expm1(2 * delta) * vb.abs().amax(dim=(0, 2)))[:, None] \
            + eps / 2 * theirs[b].double().abs() + 2e-6
        if tf32:
            bound = bound + eps * vb.abs().amax(dim=(0, 2))[:, None]
        diff = (ours[b, 0].double() - theirs[b].double()).abs()
        assert bool((diff <= bound).all()), (diff - bound).max()
    if dtype == torch.float32 and not tf32:
        assert torch.allclose(ours[:, 0], theirs, rtol=0, atol=1e-5), f"seed {seed}"


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 3), n=st.integers(1, 90), frac=st.floats(0, 1), levels=st.integers(1, 1000),
       seed=st.integers(0, 2**31 - 1), block=st.sampled_from([16, 32, 128]))
def test_evict_lowest_is_a_stable_ascending_sort(rows, n, frac, levels, seed, block):
    gen = torch.Generator().manual_seed(seed)
    # Few levels: many exact ties, broken by position (the older token is evicted first).
    importance = torch.randint(0, levels, (rows, n), generator=gen).float() / levels
    n_evict = int(frac * n)
    keep = evict_lowest(importance.to(DEVICE), n_evict, block=block).cpu()
    assert keep.shape == (rows, n - n_evict) and keep.dtype == torch.int64
    assert torch.equal(keep, evict_lowest_reference(importance, n_evict))
    for b in range(rows):
        kept = keep[b].tolist()
        assert kept == sorted(set(kept))
        evicted = sorted(set(range(n)) - set(kept))
        if kept and evicted:
            assert importance[b, evicted].max() <= importance[b, kept].min()


def test_evict_lowest_refuses_impossible_counts():
    with pytest.raises(ValueError, match="cannot evict"):
        evict_lowest(torch.zeros(1, 4, device=DEVICE), 5)


# ---------------------------------------------------------------------------- the policy
from kara_sglang.config import KaraConfig, KaraConfigError  # noqa: E402
from kara_sglang.policies import make_policy  # noqa: E402
from kara_sglang.window import WindowState  # noqa: E402


@settings(max_examples=100, deadline=None)
@given(budget=st.integers(2, 200), buffer=st.integers(1, 40), prompt=st.integers(0, 30),
       steps=st.integers(0, 700))
def test_longflow_holds_the_decode_cache_in_budget_plus_slack_and_spares_the_newest(budget, buffer, prompt,
                                                                                    steps):
    if budget <= buffer:
        with pytest.raises(KaraConfigError, match="^--kara-budget: "):
            KaraConfig(policy="longflow", budget=budget, buffer=buffer, window=256)
        return
    cfg = KaraConfig(policy="longflow", budget=budget, buffer=buffer, window=256)
    policy = make_policy(cfg)
    assert policy.query_ring == 1 and policy.query_heads == "all"  # the current query, every head
    state = WindowState(prompt_len=prompt)
    countdown = policy.steps_until_due(state)
    fired = []
    for _ in range(steps):
        state.on_decode()
        countdown -= 1
        task = policy.plan(state)
        if task is not None:
            assert countdown == 0  # the adapter's countdown never skips an eviction
            fired.append(state.decoded)
            # Prompt never a candidate; the newest U (written since the last eviction) spared.
            assert task.kv_start == prompt and task.old_end == state.kv_len
            assert task.n_suffix == buffer and task.n_queries == 1
            assert task.n_evicted == buffer and task.keep + task.n_suffix == budget
            state.apply(task, policy.tail_consumed(task))
            assert policy.plan(state) is None
        if countdown == 0 or task is not None:
            countdown = policy.steps_until_due(state)
        assert state.decode_kv < budget + buffer
    if steps >= budget + buffer:
        assert state.decode_kv >= budget
        assert fired[0] == budget + buffer
        assert all(b - a == buffer for a, b in zip(fired, fired[1:]))  # continuous: every U steps
    assert state.next_position == prompt + steps


def test_longflow_config_needs_a_budget_and_is_refused_with_one_line():
    with pytest.raises(KaraConfigError, match="^--kara-budget: the longflow policy needs"):
        KaraConfig(policy="longflow")
    with pytest.raises(KaraConfigError, match="^--kara-budget: longflow policy keeps the last U=8"):
        KaraConfig(policy="longflow", budget=8, buffer=8)
    cfg = KaraConfig(policy="longflow", budget=9, buffer=8)
    assert make_policy(cfg).name == "longflow"
    from kara_sglang.flags import request_overrides

    assert request_overrides(cfg, {"kara_budget": 20}).budget == 20
    with pytest.raises(KaraConfigError, match="kara-budget"):
        request_overrides(cfg, {"kara_budget": 4})


# ------------------------------------------------------------------ whole compressions
from kara_sglang.synthetic import SyntheticDecode  # noqa: E402


def reference_importance(sim, item):
    """Float64 importance of the item's candidates under its current query (all KV attended)."""
    t = item.task
    q = sim.queries.data[:, :, 0].cpu()
    _, imp = longflow_decode_reference(
        q, torch.tensor([item.query_row]), [b.cpu() for b in sim.queries.buffers_of(sim.k)],
        [b.cpu() for b in sim.queries.buffers_of(sim.v)], sim.req_to_token.cpu(),
        torch.tensor([item.pool_row]), torch.tensor([t.old_end]), sim.head_dim ** -0.5,
        score_start=torch.tensor([t.kv_start]), n_scores=t.n_keys)
    return imp[0]


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whole_evictions_keep_the_most_important_and_leak_nothing(page_size, dtype, device):
    cfg = KaraConfig(policy="longflow", budget=20, buffer=6, num_vote_layers=2)
    seed = 45
    prompts = [int(x) for x in torch.randint(0, 40, (3,), generator=torch.Generator().manual_seed(seed))]
    sim = SyntheticDecode(cfg, prompts, num_layers=3, page_size=page_size, seed=seed, dtype=dtype,
                          device=device)
    buffers = sim.k + sim.v
    events = 0
    for _ in range(80):
        sim.decode()
        due = sim.due()
        before = {}
        for it in due:
            t, req = it.task, sim.requests[it.pool_row]
            slots = sim.req_to_token[it.pool_row, : t.old_end].long().cpu().clone()
            rows = [b.cpu()[slots].clone() for b in buffers]
            before[it.pool_row] = (reference_importance(sim, it), list(req.positions_alive), rows)
        sim.compress(due)
        events += len(due)
        for it in due:
            t, req = it.task, sim.requests[it.pool_row]
            imp, alive, rows = before[it.pool_row]
            stored = sim.stored_positions(req)
            assert stored == req.positions_alive and len(stored) == t.new_end, f"seed {seed}"
            # The prompt and the newest U are all there; exactly U candidates went.
            assert stored[: t.kv_start] == alive[: t.kv_start], f"seed {seed}"
            assert stored[-t.n_suffix:] == alive[-t.n_suffix:], f"seed {seed}"
            candidates = alive[t.kv_start: t.kv_start + t.n_keys]
            kept = [candidates.index(p) for p in stored[t.kv_start: t.kv_start + t.keep]]
            evicted = sorted(set(range(t.n_keys)) - set(kept))
            assert len(evicted) == t.n_evicted == cfg.buffer, f"seed {seed}"
            # The evicted are the least important (up to float32 rounding of near-ties).
            assert float(imp[evicted].max()) <= float(imp[kept].min()) * (1 + 1e-5) + 1e-9, f"seed {seed}"
            # Every surviving row, prompt included, is bit-exact (only moved, never rewritten).
            new_slots = sim.req_to_token[it.pool_row, : t.new_end].long().cpu()
            old_index = list(range(t.kv_start)) + [t.kv_start + j for j in kept] + \
                list(range(t.kv_start + t.n_keys, t.old_end))
            for buf, old_rows in zip(buffers, rows):
                assert torch.equal(buf.cpu()[new_slots], old_rows[old_index]), f"seed {seed}"
        # No leak, no double free (the toy allocator raises): every page in use is owned.
        assert sim.owned_pages() == sim.alloc.in_use, f"seed {seed}"
    assert events >= 3 * 6, f"seed {seed}"
    sim.finish_all()
    assert sim.alloc.free_slots == sim.idle_free and not sim.alloc.in_use, f"seed {seed}"


# ------------------------------------------------------------------------ real SGLang
SGL_BUDGET, SGL_U = 24, 8
SYSTEM = [int(x) for x in torch.randint(10, 500, (48,), generator=torch.Generator().manual_seed(7))]


@pytest.mark.sglang
@pytest.mark.newest_release  # the scheduler path is Kara's, run on every release
def test_longflow_through_the_real_sglang_scheduler(tiny_model):
    from support.engines import assert_pool_back_to_idle, flush, last, pool_state, shared_engine, use_cpu_sglang

    use_cpu_sglang()
    prompts = ["the first step is", "answer equals seven plus two minus", "they were called people"]
    n = SGL_BUDGET + 4 * SGL_U + 3
    short_n = SGL_BUDGET + SGL_U - 1  # never reaches budget + U decode tokens
    greedy = dict(temperature=0, max_new_tokens=n, ignore_eos=True)
    short = dict(greedy, max_new_tokens=short_n)
    tail = dict(greedy, max_new_tokens=10)

    def conversation(engine):
        flush(engine)
        first = engine.generate(input_ids=SYSTEM + [11, 12], sampling_params=greedy)
        shared = engine.generate(input_ids=SYSTEM + [13, 14, 15], sampling_params=tail)
        return first, shared["meta_info"]["cached_tokens"]

    engine = shared_engine(tiny_model)  # vanilla: the session's engine of SGLang's defaults
    base = engine.generate(prompts, greedy)
    base_short = engine.generate(prompts, short)
    _, base_shared = conversation(engine)

    cfg = KaraConfig(policy="longflow", budget=SGL_BUDGET, buffer=SGL_U, num_vote_layers=2)
    # The session's shared engine of this configuration (test_sglang_layouts' LONGFLOW).
    engine = shared_engine(tiny_model, kv_policy="longflow", kara_budget=SGL_BUDGET, kara_buffer=SGL_U,
                           kara_num_vote_layers=2)
    events = pool_state(engine)["compression_events"]  # a shared engine's count so far
    # Nothing fired: token-identical to vanilla.
    for b, o in zip(base_short, engine.generate(prompts, short)):
        assert o["output_ids"] == b["output_ids"]
        assert last(o["meta_info"], "kv_tokens_evicted") == 0
    assert pool_state(engine)["compression_events"] == events
    ours = engine.generate(prompts, greedy)
    for b, o in zip(base, ours):
        meta = o["meta_info"]
        assert meta["completion_tokens"] == n
        # LongFlow's own bookkeeping: decode KV entry budget + U triggers, then every U.
        policy, state = make_policy(cfg), WindowState(prompt_len=meta["prompt_tokens"])
        for _ in range(n - 2):
            state.on_decode()
            task = policy.plan(state)
            if task is not None:
                state.apply(task, policy.tail_consumed(task))
        assert last(meta, "kv_tokens_evicted") == state.evicted == 4 * SGL_U
        assert last(meta, "kv_tokens_kept") == state.kv_len + 1
        # Identical to vanilla until the first eviction (after output token budget + U + 1).
        first = SGL_BUDGET + SGL_U + 1
        assert o["output_ids"][:first] == b["output_ids"][:first]
    assert pool_state(engine)["compression_events"] - events == 4 * len(prompts)
    long_turn, shared = conversation(engine)
    assert last(long_turn["meta_info"], "kv_tokens_evicted") > 0
    # The evicted answer stays out of the tree; the shared system prompt is still hit.
    assert shared == base_shared >= len(SYSTEM)
    assert_pool_back_to_idle(engine)
