"""A synthetic decode loop over a toy paged KV pool: the demo, tests and kernel benchmarks.

Not used when serving. It mimics what SGLang does around a policy (a page allocator that
hands out slots with ``slot % page == position % page``, a ``req_to_token`` table, per-layer
K/V buffers, one query per voting layer captured per decode step) with random K, V and Q,
and it writes each token's RoPE position into V (as ``position // 256`` and ``position % 256``,
exact even in bf16) so tests can see exactly which tokens survived where.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import List, Tuple

import torch

from kara_sglang.compressor import Compressor, DueRequest, KVLayout
from kara_sglang.config import KaraConfig
from kara_sglang.policies import make_policy
from kara_sglang.query_buffer import QueryBuffer
from kara_sglang.window import WindowState


class PageAllocator:
    """Free list of pages; refuses double frees and frees of unowned pages."""

    def __init__(self, num_slots: int, page_size: int) -> None:
        self.page_size = page_size
        self.num_pages = num_slots // page_size
        self.free_pages: List[int] = list(range(self.num_pages - 1, 0, -1))  # page 0 reserved
        self.in_use = set()

    @property
    def free_slots(self) -> int:
        return len(self.free_pages) * self.page_size

    def alloc_page(self) -> int:
        if not self.free_pages:
            raise MemoryError("toy KV pool is full")
        page = self.free_pages.pop()
        self.in_use.add(page)
        return page

    def free(self, slots: torch.Tensor) -> None:
        for page in sorted({int(s) // self.page_size for s in slots.tolist()}):
            if page not in self.in_use:
                raise AssertionError(f"page {page} freed twice or never allocated")
            self.in_use.remove(page)
            self.free_pages.append(page)


@dataclass
class SyntheticRequest:
    pool_row: int
    state: WindowState
    last_slot: int = -1
    positions_alive: List[int] = field(default_factory=list)


class SyntheticDecode:
    """Runs ``step()`` decode steps for a set of requests under one policy."""

    def __init__(self, config: KaraConfig, prompt_lens: List[int], num_layers: int = 4,
                 q_heads: int = 8, kv_heads: int = 2, head_dim: int = 32,
                 num_slots: int = 1 << 14, page_size: int = 1, max_context: int = 1 << 13,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0,
                 profile: bool = False, head_shard: Tuple[int, int] = (0, 1)) -> None:
        self.gen = torch.Generator(device=device).manual_seed(seed)
        self.config, self.device, self.dtype = config, device, dtype
        self.head_dim = head_dim
        # Tensor parallelism: (rank, world). Every rank draws the full-head K and queries
        # (one random stream) and keeps its contiguous share of the heads, as SGLang's TP does.
        rank, world = head_shard
        if q_heads % world or kv_heads % world:
            raise ValueError(f"{q_heads} query / {kv_heads} KV heads do not split over {world} ranks")
        self.full_q_heads, self.full_kv_heads = q_heads, kv_heads
        q_heads, kv_heads = q_heads // world, kv_heads // world
        self.q_slice = slice(rank * q_heads, (rank + 1) * q_heads)
        self.kv_slice = slice(rank * kv_heads, (rank + 1) * kv_heads)
        self.q_heads = q_heads
        self.policy = make_policy(config)
        shape = (num_slots, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        n = len(prompt_lens)
        self.req_to_token = torch.zeros(n, max_context, dtype=torch.int32, device=device)
        self.alloc = PageAllocator(num_slots, page_size)
        self.idle_free = self.alloc.free_slots
        layout = KVLayout(self.req_to_token, self.k, self.v, page_size)
        self.queries = None
        if self.policy.query_ring:
            self.queries = QueryBuffer(n, config.resolve_vote_layers(num_layers),
                                       self.policy.query_ring, q_heads, kv_heads, head_dim,
                                       self.policy.query_heads, dtype, device)
        self.compressor = Compressor(self.policy, layout, self.queries, head_dim ** -0.5, profile)
        self.requests = [SyntheticRequest(i, WindowState(prompt_len=p)) for i, p in enumerate(prompt_lens)]
        self.exact_prefix = torch.zeros(n, dtype=torch.int64, device=device)  # as the adapter keeps it
        for req in self.requests:
            for _ in range(req.state.prompt_len):
                self._write_token(req)
        self.compress_seconds = 0.0

    def _slot_for(self, req: SyntheticRequest, kv_index: int) -> int:
        page = self.alloc.page_size
        if kv_index % page == 0:
            return self.alloc.alloc_page() * page
        return req.last_slot + 1

    def _write_token(self, req: SyntheticRequest) -> None:
        kv_index = len(req.positions_alive)
        slot = self._slot_for(req, kv_index)
        req.last_slot = slot
        self.req_to_token[req.pool_row, kv_index] = slot
        position = req.state.next_position if kv_index >= req.state.prompt_len else kv_index
        for k, v in zip(self.k, self.v):
            k[slot] = torch.randn((self.full_kv_heads, self.head_dim), generator=self.gen, device=self.device,
                                  dtype=self.dtype)[self.kv_slice]
            v[slot] = 0
            v[slot, 0, 0], v[slot, 0, 1] = position // 256, position % 256
        req.positions_alive.append(position)

    def step(self) -> List[DueRequest]:
        """One decode step for every request, then the compressions it made due."""
        self.decode()
        return self.compress(self.due())

    def decode(self) -> None:
        """Write one token (K, V, voting queries) for every request."""
        for req in self.requests:
            ring_pos = req.state.decoded % self.policy.query_ring if self.queries else 0
            self._write_token(req)
            req.state.on_decode()
            if self.queries is not None:
                for layer in self.queries.vote_layers:
                    q = torch.randn(1, self.full_q_heads, self.head_dim, generator=self.gen,
                                    device=self.device, dtype=self.dtype)[:, self.q_slice]
                    self.queries.capture(layer, q, torch.tensor([req.pool_row], device=self.device),
                                         torch.tensor([ring_pos], device=self.device))

    def due(self) -> List[DueRequest]:
        """The compressions the policy wants now."""
        due = []
        for req in self.requests:
            task = self.policy.plan(req.state)
            if task is not None:
                due.append(DueRequest(req.pool_row, req.pool_row, task, first=req.state.evicted == 0))
        return due

    def compress(self, due: List[DueRequest]) -> List[DueRequest]:
        """Run ``due`` through the compressor and the allocator; update the bookkeeping."""
        if due:
            if self.device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            freed = self.compressor.run(due, exact_prefix=self.exact_prefix)
            if self.device != "cpu":
                torch.cuda.synchronize()
            self.compress_seconds += time.perf_counter() - t0
            self.alloc.free(freed)
            for item in due:
                req = self.requests[item.pool_row]
                req.state.apply(item.task, self.policy.tail_consumed(item.task))
                alive = req.positions_alive
                new_alive = alive[: item.task.kv_start]
                new_alive += [alive[item.task.kv_start + j] for j in self._kept_of(item)]
                new_alive += alive[item.task.kv_start + item.task.n_keys:]
                req.positions_alive = new_alive
                req.last_slot = int(self.req_to_token[req.pool_row, req.state.kv_len - 1])
        return due

    def _kept_of(self, item: DueRequest) -> List[int]:
        """Kept offsets as the V buffer shows them (read back, not recomputed)."""
        t = item.task
        slots = self.req_to_token[item.pool_row, t.kv_start: t.kv_start + t.keep].long()
        kept_positions = self._positions_at(slots)
        region = self.requests[item.pool_row].positions_alive[t.kv_start: t.kv_start + t.n_keys]
        index = {p: i for i, p in enumerate(region)}
        return [index[p] for p in kept_positions]

    def stored_positions(self, req: SyntheticRequest) -> List[int]:
        """The RoPE positions the pool holds for ``req``, in KV order (from the V buffer)."""
        return self._positions_at(self.req_to_token[req.pool_row, : req.state.kv_len].long())

    def _positions_at(self, slots: torch.Tensor) -> List[int]:
        marks = self.v[0][slots, 0, :2].long()
        return (marks[:, 0] * 256 + marks[:, 1]).tolist()

    def owned_pages(self) -> set:
        """Pages holding some request's live KV: after any compression, exactly the pages
        the allocator has in use (a leak or a double free shows up as a difference)."""
        page = self.alloc.page_size
        pages = set()
        for req in self.requests:
            pages |= {s // page for s in self.req_to_token[req.pool_row, : req.state.kv_len].tolist()}
        return pages

    def finish_all(self) -> None:
        """Free every request's pages, as SGLang does when requests finish."""
        for req in self.requests:
            page = self.alloc.page_size
            n = req.state.kv_len
            slots = self.req_to_token[req.pool_row, :n].long()
            self.alloc.free(slots[::page] if page > 1 else slots)
            req.state = WindowState(prompt_len=0)
