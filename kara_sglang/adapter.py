"""The bridge between SGLang's scheduler objects and the compressor (scheduler process only).

One :class:`KaraRuntime` lives in each scheduler process whose server runs a policy other
than ``none``. The patches call it at four moments: a decode forward (capture queries), a
decode batch's positions (add each request's evicted count), the end of a decode step
(compress the due requests, free their slots, fix SGLang's lengths) and a request's release
(hand the radix tree only the exact prefix). Everything SGLang-specific that is more than one
call lives here; the patches stay one-liners around it.
"""

from __future__ import annotations

import dataclasses
import logging
from array import array
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from kara_sglang.compressor import Compressor, DueRequest, KVLayout, page_ceil, to_device
from kara_sglang.config import KaraConfig, KaraConfigError
from kara_sglang.flags import request_overrides
from kara_sglang.fp8_kv import FP8_DTYPES
from kara_sglang.kept_positions import KeptPositions, block_size_from_env
from kara_sglang.overhead import OverheadMeter
from kara_sglang.policies import KVPolicy, make_policy
from kara_sglang.query_buffer import QueryBuffer
from kara_kernels.recall import QUANT_GROUP
from kara_sglang.recall import RecallStore, bits_of, recall_attention, recall_attention_tier, recall_fill_tier
from kara_sglang.recall_tune import tune_fill_for_server
from kara_sglang.recall_tier import RecallTier
from kara_sglang import kv_pool, req_kv, session_continue, swa_window
from kara_sglang.reasoning import ReasoningEnd
from kara_sglang.tp import reducer_for
from kara_sglang.window import WindowState

logger = logging.getLogger("kara_sglang")

_RUNTIME: Optional["KaraRuntime"] = None


def current() -> Optional["KaraRuntime"]:
    """The runtime of this process, or ``None`` (policy ``none`` or not a scheduler)."""
    return _RUNTIME


class RequestKV:
    """Kara's state of one running request (stored on the SGLang ``Req`` as ``req.kara``).

    ``countdown`` is the number of decode steps before the policy could have a task: the
    per-step work for a request that is not due is one decrement (this loop runs over the
    whole batch every step, on the host).
    """

    __slots__ = ("window", "policy", "countdown", "kept", "continues")

    def __init__(self, window: WindowState, policy: Optional[KVPolicy], track_kept: bool = False,
                 continues: bool = False) -> None:
        self.window = window
        self.policy = policy  # None: the request opted out
        self.countdown = policy.steps_until_due(window) if policy is not None else -1
        self.continues = continues  # its session keeps the compacted row (kara_session_continue)
        # Which decode tokens the row still holds: for block coverage, and for the KV-space
        # prompt of a continued session's next turn.
        self.kept: Optional[KeptPositions] = KeptPositions() if track_kept or continues else None


def base_evicted(req: Any) -> int:
    """Tokens a continued session turn's prompt already lacks (0 for any other request)."""
    history = getattr(req, "kara_prompt_history", None)
    return history.evicted if history is not None else 0


def _in_streaming_session(req: Any) -> bool:
    session = getattr(req, "session", None)
    return session is not None and bool(getattr(session, "streaming", False))


def _opted_in(req: Any) -> bool:
    """The request's ``kara_session_continue`` value, parsed once and kept on the ``Req``
    (a non-boolean raises ``KaraConfigError`` every time: the request is refused)."""
    opted = getattr(req, "kara_opted_in", None)
    if opted is None:
        opted = req.kara_opted_in = session_continue.requested(getattr(req.sampling_params, "custom_params", None))
    return opted


class OverlapView:
    """What Kara needs of SGLang's overlap scheduler (``Scheduler.event_loop_overlap``).

    With overlap on, SGLang prepares step N+1 (one more KV slot for every running request,
    its lengths + 1) and launches it *before* it processes step N's results, where Kara
    compresses. A compression at the end of step N therefore (1) runs after step N+1 on the
    GPU, which still reads the uncompressed rows and writes the new token's KV and query;
    (2) slides that in-flight column left with the rest of the tail; (3) shortens the lengths
    of the batch SGLang already prepared (its running batch), not only those of the copy of
    step N it hands to result processing.
    """

    def __init__(self, scheduler: Any) -> None:
        self._scheduler = scheduler

    def prepared_batch(self) -> Any:
        return getattr(self._scheduler, "running_batch", None)

    def follow_forward(self) -> None:
        """Order the current stream's next work after the forward step in flight (no host wait)."""
        stream = getattr(self._scheduler, "forward_stream", None)
        if isinstance(stream, torch.cuda.Stream):
            torch.cuda.current_stream().wait_stream(stream)


class KaraRuntime:
    """Per-scheduler state: config, query buffer, compressor, counters."""

    def __init__(self, config: KaraConfig, model_runner: Any, page_size: int,
                 reasoning_end: Optional[ReasoningEnd] = None, overlap: Optional[OverlapView] = None) -> None:
        self.config = config
        self.overlap = overlap  # set: SGLang's overlap scheduler runs one step ahead
        self.reasoning_end = reasoning_end  # set: compress only the thinking segment
        self.policy = make_policy(config)
        self.page_size = page_size
        pool = model_runner.token_to_kv_pool
        kv_pool.check_supported(pool, config, page_size, getattr(model_runner, "sliding_window_size", None))
        # FP8 caches are stored as bytes; queries stay in the model's dtype (kara_sglang/fp8_kv.py).
        self.fp8_dtype = pool.dtype if pool.dtype in FP8_DTYPES else None
        query_dtype = model_runner.dtype if self.fp8_dtype is not None else pool.dtype
        self.kv_pool = pool
        self.req_to_token_pool = model_runner.req_to_token_pool
        device = self.req_to_token_pool.req_to_token.device
        rows = self.req_to_token_pool.req_to_token.shape[0]
        shape = kv_pool.shape_of(pool)  # MLA: one latent "KV head" per layer; SWA: the full-attention layers
        self.swa = shape.kind == "swa"  # hybrid SWA pool: each request's SWA cursor follows compaction
        self.sliding_window = getattr(model_runner, "sliding_window_size", None)
        self.swa_released = 0  # SWA peers Kara released itself (SGLang's window eviction had not yet)
        num_layers = shape.num_layers
        # Under tensor parallelism this rank holds 1/N of the query heads (and its K pool
        # holds its share of the KV heads: pool.head_num).
        self.tp = reducer_for(model_runner)
        tp_size = self.tp.world_size if self.tp is not None else 1
        q_heads = model_runner.model_config.num_attention_heads // tp_size
        kv_heads, head_dim = shape.kv_heads, shape.head_dim
        self.queries: Optional[QueryBuffer] = None
        if self.policy.query_ring:
            self.queries = QueryBuffer(
                rows, kv_pool.vote_layers(pool, config), self.policy.query_ring, q_heads,
                kv_heads, head_dim, self.policy.query_heads, query_dtype, device)
            self._last_vote_layer = self.queries.vote_layers[-1]
            self.ring_pos = torch.zeros(rows, dtype=torch.int64, device=device)
            mb = self.queries.data.numel() * self.queries.data.element_size() / 2**20
            logger.info("kara: query buffer %s = %.1f MiB (%d rows, layers %s)",
                        tuple(self.queries.data.shape), mb, rows, self.queries.vote_layers)
        self.k_scales = [1.0] * num_layers  # FP8: each layer's k_scale, read as the layers run
        self.evicted_by_row = torch.zeros(rows, dtype=torch.int64, device=device)
        # Where each compressed request's exact KV prefix ends (kept by the compressor).
        self.exact_prefix_by_row = torch.zeros(rows, dtype=torch.int64, device=device)
        self.rows_with_evictions = 0
        self.sm_scale = head_dim ** -0.5
        self.compressor = Compressor(self.policy, self._layout(), self.queries, self.sm_scale)
        self._policies: Dict[KaraConfig, KVPolicy] = {config: self.policy}
        self.debug_checks = os.environ.get("KARA_DEBUG_CHECKS", "0") not in ("", "0")
        # The recall-output check recomputes each layer's recall under Triton's interpreter: two
        # thirds of a CPU tier stress run's time (py-spy). Long stress runs, whose point is slot
        # accounting, check every Nth decode step's output instead (default: every step).
        self.recall_check_every = max(1, int(os.environ.get("KARA_DEBUG_RECALL_EVERY", "1")))
        self.recall_check_steps = 0
        if self.tp is not None:
            self.compressor.reduce_scores = self.tp
            if self.debug_checks:
                self.compressor.check_keep = lambda keep: self.tp.check_same("a keep set", keep)
        self.freed_total = 0
        self.overhead = OverheadMeter(device)
        self.kept_block = block_size_from_env()  # evaluation only: block coverage per request
        self._kept_by_row: Dict[int, Any] = {}  # the compression step's requests by req_to_token row
        self.compressor.on_keep = self._record_keep  # a no-op unless a request tracks its kept tokens
        # Recall: ``recall`` lists each row's evicted tokens for ranking: held pool slots (the
        # emulation) or, with a tier, the row's tier slots (``tier.rows``).
        self.recall: Optional[RecallStore] = None
        self.tier: Optional[RecallTier] = None
        self.recall_queries: Optional[torch.Tensor] = None  # lag 1: each row's previous query per layer
        if config.recall_tokens:
            self._check_recall(model_runner)
            row_capacity = self.req_to_token_pool.req_to_token.shape[1]
            if config.recall_tier_tokens:
                if config.recall_horizon:
                    # A row never holds more than the horizon: the ranking a CUDA graph captures
                    # spans H columns, not the request's whole width.
                    row_capacity = min(row_capacity, config.recall_horizon)
                self.tier = self._make_tier(num_layers, kv_heads, head_dim, rows, row_capacity, device)
                self.recall = self.tier.rows
                # Before CUDA graphs are captured: the fill's fastest correct launch on this GPU.
                self.fill_launch = tune_fill_for_server(q_heads, kv_heads, head_dim, self.tier.bits, rows,
                                                        config.recall_tier_tokens, row_capacity,
                                                        config.recall_tokens, query_dtype, device,
                                                        config.recall_pages, config.recall_horizon)
                # Each row's recall buffer (kara_sglang/window.py, CompressionTask.recall_buffer):
                # its pool slots, the column after it, and whether it is written this step.
                width = config.recall_tokens
                self.buffer_slots = torch.zeros(rows, width, dtype=torch.int64, device=device)
                self.buffer_end = torch.zeros(rows, dtype=torch.int64, device=device)
                self.buffer_on = torch.zeros(rows, dtype=torch.int32, device=device)
                self.buffer_rows: set = set()  # rows holding a buffer (host)
                # Per layer, row, KV head and buffer position: the tier column its slot holds
                # for that head (-1: none known), so a step writes only what changed
                # (kernels/recall_buffer.py).
                self.buffer_held = torch.full((num_layers, rows, kv_heads, width), -1, dtype=torch.int32,
                                              device=device)
                # Buffers filled, summed over steps (counted on the device, inside CUDA graphs
                # too: shows that the captured steps fill them).
                self.buffer_fills = torch.zeros((), dtype=torch.int64, device=device)
                # Picks and picks written (not held yet), summed over steps, layers and KV
                # heads: the buffer's hit rate is 1 - written / picks.
                self.buffer_picks = torch.zeros(2, dtype=torch.int64, device=device)
                # This step's live buffers and tier counts, set by its first layer's fill.
                self._first_layer = getattr(self.kv_pool, "start_layer", 0) or 0
                self._step_batch: Any = None
                self._step_live: Optional[torch.Tensor] = None
                self._step_counts: Optional[torch.Tensor] = None
                self._tier_plan: Dict[int, bool] = {}  # this step's windows: stored in the tier or not
                self._tier_drop: Dict[int, int] = {}  # this step's rows dropping old tier tokens (horizon)
            else:
                self.recall = RecallStore(rows, row_capacity, device)
            if config.recall_lag:
                self.recall_queries = torch.zeros(rows, num_layers, q_heads, head_dim, dtype=query_dtype,
                                                  device=device)
        logger.info("kara: %s", config)

    # ------------------------------------------------------------------ set-up
    def _check_recall(self, model_runner: Any) -> None:
        """What recall's attention (plain softmax over the selected keys) does not model."""
        head_dim = self.kv_pool.head_dim
        for flag, value in (("digest", self.config.recall_digest), ("kv", self.config.recall_kv)):
            if value != "exact" and head_dim % QUANT_GROUP:
                raise KaraConfigError(f"--kara-recall-{flag} {value}: needs a head dim divisible by "
                                      f"{QUANT_GROUP}, this model has {head_dim}")
        if self.page_size != 1:
            raise KaraConfigError(f"--kara-recall-tokens: needs page size 1, this server has {self.page_size}")
        for module in model_runner.model.modules():
            if type(module).__name__ != "RadixAttention":
                continue
            if (getattr(module, "logit_cap", 0) or 0) > 0 or (getattr(module, "sliding_window_size", -1) or -1) > -1:
                raise KaraConfigError("--kara-recall-tokens: not supported for models with logit soft-capping "
                                      "or sliding-window attention layers")

    def _make_tier(self, num_layers: int, kv_heads: int, head_dim: int, rows: int, row_capacity: int,
                   device: torch.device) -> RecallTier:
        """The GPU tier, allocated once; refused in one line if the device cannot hold it."""
        bits = bits_of(self.config.recall_kv)
        v_head_dim = kv_pool.value_buffers(self.kv_pool)[0].shape[-1]
        tokens = self.config.recall_tier_tokens
        pages = bool(self.config.recall_pages)
        need = RecallTier.bytes_needed(num_layers, tokens, kv_heads, head_dim, v_head_dim, bits, rows, pages)
        need += num_layers * rows * kv_heads * self.config.recall_tokens * 4  # the buffers' held map
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            if need > free:
                raise KaraConfigError(
                    f"--kara-recall-tier-tokens {tokens}: the tier needs {need / 2**30:.2f} GiB, the GPU has "
                    f"{free / 2**30:.2f} GiB free after SGLang's pool (lower --mem-fraction-static or the tier)")
        logger.info("kara: recall tier of %d tokens at %d bits = %.1f MiB", tokens, bits, need / 2**20)
        return RecallTier(num_layers, tokens, kv_heads, head_dim, v_head_dim, bits, rows, row_capacity, device,
                          pages=pages)

    def _layout(self) -> KVLayout:
        # Read the buffers each time: SGLang may reallocate the pool after graph capture.
        pool = self.kv_pool
        return KVLayout(self.req_to_token_pool.req_to_token, kv_pool.key_buffers(pool), kv_pool.value_buffers(pool),
                        self.page_size, self.fp8_dtype, self.k_scales, kv_pool.values_in_keys(pool))

    def policy_for(self, req: Any) -> Optional[KVPolicy]:
        """The request's policy (``None`` if it opted out); its config was validated on arrival."""
        params = getattr(req.sampling_params, "custom_params", None)
        cfg = request_overrides(self.config, params)
        if cfg.policy == "none":
            return None
        policy = self._policies.get(cfg)
        if policy is None:
            policy = self._policies[cfg] = make_policy(cfg)
        return policy

    def validate_request(self, req: Any) -> Optional[str]:
        """One-line error for bad per-request settings, or ``None``."""
        try:
            self.policy_for(req)
            opted_in = _opted_in(req)
        except KaraConfigError as err:
            return f"kara-sglang: invalid custom_params: {err}"
        refusal = getattr(req, "kara_refusal", None)
        if refusal is not None:
            return refusal
        if opted_in:
            if not _in_streaming_session(req):
                return (f"kara-sglang: {session_continue.KEY} needs a streaming session "
                        "(open_session(streaming=True) on a server started with --enable-streaming-session)")
            if self.tp is not None:
                return f"kara-sglang: {session_continue.KEY} is not supported with --tp-size > 1"
            if self.recall is not None:
                return f"kara-sglang: {session_continue.KEY} is not supported with --kara-recall-tokens"
        return None

    @staticmethod
    def _continues(req: Any) -> bool:
        """The request opted in to continuing its streaming session on compressed KV."""
        try:
            return _in_streaming_session(req) and _opted_in(req)
        except KaraConfigError:
            return False  # refused by validate_request

    # ------------------------------------------------------------ session turns
    def on_session_turn(self, session: Any, req: Any, new_ids: Any) -> None:
        """A session built a turn's request: put its prompt in KV space if the session's row
        holds a compressed conversation (``kara_sglang.session_continue``)."""
        if req.to_finish is not None or not getattr(session, "streaming", False) or len(session.req_nodes) != 1:
            return
        [node] = session.req_nodes.values()
        history: Optional[session_continue.History] = getattr(node.req, "kara_history", None)
        if history is None:
            return  # the row is the token-space conversation (nothing evicted): as vanilla
        if not self._continues(req):
            # Its row is no longer the token-space conversation, so a turn that reads it as
            # one would attend to the wrong KV: refused (validate_request), not served.
            req.kara_refusal = (
                f"kara-sglang: this streaming session continues on compressed KV; set "
                f"custom_params {{\"{session_continue.KEY}\": true}} on every later turn, or open a new session")
            return
        ids = history.ids + [int(t) for t in new_ids]
        if isinstance(req.origin_input_ids, array):
            ids = array(req.origin_input_ids.typecode, ids)
        req.origin_input_ids = ids
        req.origin_input_ids_unpadded = ids
        req.full_untruncated_fill_ids = array("q")  # rebuilt from the new prompt on first use
        req.kara_prompt_history = history

    # ------------------------------------------------------------ decode forward
    def capture(self, layer: Any, q: torch.Tensor, forward_batch: Any, q_rope: Optional[torch.Tensor] = None) -> None:
        """Store this decode step's queries of a voting layer (graph-capturable: tensor ops only).

        ``q_rope``: MLA's rope part, when the backend takes it apart from ``q``."""
        layer_id = kv_pool.layer_index(self.kv_pool, layer.layer_id)  # None: a sliding-window layer
        if self.queries is None or layer_id is None or not self.queries.votes(layer_id):
            return
        self.sm_scale = float(layer.scaling)
        self.compressor.sm_scale = self.sm_scale
        if self.fp8_dtype is not None:  # host work: runs once when CUDA graphs are captured
            scale = layer.k_scale_float if layer.k_scale_float is not None else layer.k_scale
            self.k_scales[layer_id] = 1.0 if scale is None else float(scale)
        rows = forward_batch.req_pool_indices
        pos = self.ring_pos[rows]
        self.queries.capture(layer_id, kv_pool.latent_query(q, q_rope, self.queries.q_heads), rows, pos)
        if layer_id == self._last_vote_layer:
            self.ring_pos[rows] = (pos + 1) % self.queries.ring

    def _recall_queries(self, layer: Any, q: torch.Tensor, rows: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The step's queries ``[B, Hq, D]`` and those that rank (lag 1: the previous step's,
        then this step's are stored for the next)."""
        queries = q.reshape(rows.shape[0], layer.tp_q_head_num, -1)
        if self.recall_queries is None:
            return queries, queries
        select = self.recall_queries[rows, layer.layer_id].clone()
        self.recall_queries[rows, layer.layer_id] = queries.to(self.recall_queries.dtype)
        return queries, select

    def recall_fill(self, layer: Any, q: torch.Tensor, forward_batch: Any) -> None:
        """Before a decode step's attention, with a tier: each request holding a recall buffer
        gets the tier tokens its query selects written into it (kara_sglang/recall.py,
        ``recall_fill_tier``), and SGLang's attention then reads them with the resident tokens.

        Graph-capturable: while a CUDA graph is captured the ranking spans the tier row's full
        width and nothing is decided on the host; run eagerly it spans the longest row held.
        """
        rows = forward_batch.req_pool_indices
        _, select = self._recall_queries(layer, q, rows)
        capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
        if not capturing and not self.buffer_rows:
            return
        n_cols = self.recall.slots.shape[1] if capturing else self.recall.longest
        # Which buffers are live and each row's tier count are the same in every layer of a
        # step: computed in the step's first layer and reused (about seven small kernels a
        # layer fewer, a fixed cost CUDA graphs keep). Recomputed at each step's first layer,
        # not only when the batch object changes: a CUDA graph's capture runs one batch object
        # more than once, and the captured run must compute them itself.
        if layer.layer_id == self._first_layer or forward_batch is not self._step_batch:
            self._step_batch = forward_batch
            self._step_live = self._live_buffers(forward_batch)
            self._step_counts = self.recall.counts[rows]
            self.buffer_fills.add_(self._step_live.sum())
        recall_fill_tier(select, self.tier.layer(layer.layer_id), self.tier.bits, self.recall.slots, rows,
                         self._step_counts, self._step_live, self.buffer_slots, self.buffer_held[layer.layer_id],
                         self.kv_pool.get_key_buffer(layer.layer_id), self.kv_pool.get_value_buffer(layer.layer_id),
                         float(layer.scaling), n_cols, self.fill_launch,
                         self.tier.layer_pages(layer.layer_id) if self.config.recall_pages else None,
                         self.config.recall_pages, self.buffer_picks)

    def _live_buffers(self, forward_batch: Any) -> torch.Tensor:
        """``[B]`` int32: 1 where the batch entry's recall buffer is written and read this step.
        A padded entry of a captured batch names row 0 with a length of at most 1: never live."""
        rows = forward_batch.req_pool_indices
        return self.buffer_on[rows] * (forward_batch.seq_lens > self.buffer_end[rows])

    def check_recall_output(self, layer: Any, q: torch.Tensor, out: Any, forward_batch: Any) -> None:
        """Debug (eager steps): SGLang's attention output for each request with a live buffer
        equals recall's own kernel over the row's resident columns without the buffer plus the
        same selected tier tokens (kernels/recall_tier.py, ``recall_decode_tier``)."""
        if self.recall_queries is not None:
            return  # lag 0 only: lag 1's queries were consumed by the fill
        if layer.layer_id == self._first_layer:
            self.recall_check_steps += 1
        if (self.recall_check_steps - 1) % self.recall_check_every:
            return
        rows = forward_batch.req_pool_indices
        live = self._live_buffers(forward_batch).bool()
        if not isinstance(out, torch.Tensor) or not bool(live.any()):
            return
        B, Hq = rows.shape[0], layer.tp_q_head_num
        queries = q.reshape(B, Hq, -1)
        R, table = self.config.recall_tokens, self.req_to_token_pool.req_to_token
        resident = table.clone()  # each live row without its buffer's columns
        lens = forward_batch.seq_lens.clone().to(torch.int64)
        for b, (row, n, end) in enumerate(zip(rows.tolist(), lens.tolist(), self.buffer_end[rows].tolist())):
            if live[b]:
                cols = list(range(end - R)) + list(range(end, n))
                resident[row, :len(cols)] = table[row, cols]
                lens[b] = len(cols)
        # Rows that are not live are compared with nothing (their selection is not attended).
        want = recall_attention_tier(queries, queries, self.kv_pool.get_key_buffer(layer.layer_id),
                                     self.kv_pool.get_value_buffer(layer.layer_id), resident, lens,
                                     self.tier.layer(layer.layer_id), self.tier.bits, self.recall.slots, rows,
                                     self.recall.counts[rows], R, float(layer.scaling), n_cols=self.recall.longest)
        got = out.view(B, Hq, -1)[live].float()
        tol = 1e-3 if out.dtype == torch.float32 else 5e-2
        if not torch.allclose(got, want[live], atol=tol, rtol=tol):
            raise AssertionError(f"kara recall: layer {layer.layer_id}: SGLang's attention over the recall "
                                 f"buffer is {(got - want[live]).abs().max():.3g} from recall's own kernel")

    def recall_attend(self, layer: Any, q: torch.Tensor, out: torch.Tensor, forward_batch: Any) -> torch.Tensor:
        """The recall emulation's decode output: rows holding evicted slots attend to their
        resident tokens plus the evicted ones their (lag-0 or lag-1) query selects; the other
        rows keep SGLang's output. Outside CUDA graphs."""
        rows = forward_batch.req_pool_indices
        B, Hq = rows.shape[0], layer.tp_q_head_num
        queries, select = self._recall_queries(layer, q, rows)
        held = self.recall.longest
        if held == 0 or not isinstance(out, torch.Tensor):
            return out
        k_buffer = self.kv_pool.get_key_buffer(layer.layer_id)
        v_buffer = self.kv_pool.get_value_buffer(layer.layer_id)
        evicted_lens = self.recall.counts[rows]
        attended = recall_attention(
            queries, select, k_buffer, v_buffer, self.req_to_token_pool.req_to_token, forward_batch.seq_lens,
            self.recall.slots, rows, evicted_lens, self.config.recall_tokens,
            self.config.recall_digest, float(layer.scaling), n_cols=held, kv=self.config.recall_kv)
        shaped = out.view(B, Hq, -1)
        shaped.copy_(torch.where((evicted_lens > 0)[:, None, None], attended.to(out.dtype), shaped))
        return out

    def position_offsets(self, req_pool_indices: torch.Tensor) -> Optional[torch.Tensor]:
        """Per-request RoPE offsets for a decode batch, or ``None`` when nothing was evicted."""
        if self.rows_with_evictions == 0:
            return None
        return self.evicted_by_row[req_pool_indices]

    def extend_positions(self, reqs: List[Any], prefix_lens: List[int], extend_lens: List[int]) -> Optional[torch.Tensor]:
        """RoPE positions of an extend batch that holds a continued session turn, or ``None``.

        Its prompt is in KV space: column ``c`` sits at the history's position for it, and a
        new token ``evicted`` past its column. The row's decode offset is set here too, so
        the turn's first decode step (prepared right after this one) already has it.
        """
        if not any(getattr(r, "kara_prompt_history", None) is not None for r in reqs):
            return None
        positions: List[int] = []
        for req, start, n in zip(reqs, prefix_lens, extend_lens):
            history = getattr(req, "kara_prompt_history", None)
            if history is None:
                positions.extend(range(start, start + n))
                continue
            positions.extend(history.position(c) for c in range(start, start + n))
            row = req_kv.pool_row(req)
            if row is not None and getattr(req, "kara_offset", 0) != history.evicted:
                self.set_offset(req, row, history.evicted)
        return torch.tensor(positions, dtype=torch.int64)

    def set_offset(self, req: Any, row: int, value: int) -> None:
        """Write one row's decode position offset; ``rows_with_evictions`` counts the nonzero ones."""
        old = getattr(req, "kara_offset", 0)
        if old == value:
            return
        self.rows_with_evictions += (value != 0) - (old != 0)
        self.evicted_by_row[row] = value
        req.kara_offset = value

    # -------------------------------------------------------------- decode step
    def after_decode(self, batch: Any, allocator: Any) -> None:
        """Compress every running request of ``batch`` whose policy says so."""
        start = time.perf_counter()
        self._after_decode(batch, allocator)
        self.overhead.step_done(time.perf_counter() - start)

    def _after_decode(self, batch: Any, allocator: Any) -> None:
        due: List[Tuple[Any, DueRequest, KVPolicy, Any]] = []
        tier_room = [self.tier.n_free] if self.tier is not None else None
        for req in batch.reqs:
            row = req_kv.pool_row(req)
            if row is None:
                continue  # released this step
            state: Optional[RequestKV] = getattr(req, "kara", None)
            if state is None:
                # First decode step: everything before this step's token is prompt (or a
                # re-prefilled retraction) and stays untouched. Every token but the newest
                # sampled one has its KV written by now; SGLang's own count may already
                # include the next step's slot (overlap scheduling).
                kv_now = len(req.origin_input_ids) + len(req.output_ids) - 1 if self.overlap else req_kv.committed_len(req)
                policy = self.policy_for(req)
                if self.reasoning_end is not None and (
                        self.reasoning_end.closed_in_prompt(req.origin_input_ids)
                        or self.reasoning_end.emitted_in(req.output_ids)):
                    # The template closed thinking (the whole reply is answer), or a request
                    # re-prefilled after a retraction had already left it.
                    policy = None
                state = RequestKV(WindowState(prompt_len=kv_now - 1), policy,
                                  track_kept=self.kept_block is not None, continues=self._continues(req))
                req.kara = state
            state.window.on_decode()
            if state.kept is not None:
                state.kept.on_decode()
            if self.reasoning_end is not None and state.policy is not None \
                    and self.reasoning_end.just_emitted(req.output_ids):
                state.policy, state.countdown = None, -1  # answer from here on: never compressed
            # 1: the overlap scheduler already gave the request its next step's slot.
            committed = req_kv.committed_len(req)
            in_flight = committed - state.window.kv_len
            if self.debug_checks and not (in_flight == 0 or (in_flight == 1 and self.overlap)):
                raise AssertionError(
                    f"kara: request {req.rid} holds {committed} KV entries, kara counted "
                    f"{state.window.kv_len}")
            state.countdown -= 1
            if state.countdown != 0:
                continue  # not due yet (or opted out: the countdown never reaches 0)
            task = state.policy.plan(state.window)
            state.countdown = state.policy.steps_until_due(state.window) if task is None else 0
            if task is None:
                continue
            if task.kv_start < req_kv.protected_len(req):
                raise AssertionError(f"kara: refusing to touch radix-tree slots of request {req.rid}")
            if tier_room is not None:
                task = self._plan_tier(row, task, state.policy, tier_room)
            # The in-flight column (written by the step already launched) slides with the tail.
            moved = dataclasses.replace(task, n_suffix=task.n_suffix + 1) if in_flight else task
            due.append((req, DueRequest(row, row, moved,
                                        first=state.window.evicted == 0), state.policy, task))
        if due:
            if self.overlap is not None:
                self.overlap.follow_forward()  # before the GPU timer starts: not our time
            self.overhead.compress_begin()
            self._compress(batch, allocator, due)
            self.overhead.compress_end()

    def _plan_tier(self, row: int, task: Any, policy: KVPolicy, room: List[int]) -> Any:
        """Whether this window's evicted tokens go into the tier (decided here, on the host,
        so that a window is stored whole or not at all), and, for a row without a recall
        buffer, whether this compression creates one (its task then keeps R more columns).

        The tier stores only windows of rows with a buffer (the others could never be
        recalled); a window it cannot hold is evicted as without recall (``fallback_tokens``).
        With a horizon the row first drops its oldest tier tokens to make room for the window
        (``_tier_drop``, done in ``_store_in_tier`` once the step in flight is waited for).
        """
        R, n, horizon = self.config.recall_tokens, task.n_evicted, self.config.recall_horizon
        creates = row not in self.buffer_rows
        have = self.recall.count(row)
        drop = RecallTier.horizon_drop(have, n, horizon) if horizon else 0
        fits = (n <= room[0] + drop and have - drop + n <= self.recall.slots.shape[1]
                and (not horizon or (n <= horizon and have - drop + n >= R))
                and policy.name == "kara" and (not creates or n > R))
        self._tier_plan[row] = fits
        if not fits:
            return task
        if drop:
            self._tier_drop[row] = drop
        room[0] -= n - drop
        return dataclasses.replace(task, keep=task.keep + R, recall_buffer=R) if creates else task

    def _store_in_tier(self, freed_rows: List[int], freed_counts: List[int], freed_slots: torch.Tensor,
                       due) -> None:
        """Quantise the planned windows' evicted tokens into the tier (a new buffer's slots
        are evicted tokens too) and switch the new buffers on; every other freed slot is freed."""
        for row, drop in self._tier_drop.items():
            self._drop_from_tier(row, drop)
        self._tier_drop = {}
        new_buffers = {row: slots for rows, group in self.compressor.recall_buffers for row, slots in zip(rows, group)}
        store_rows, store_counts, pieces, start = [], [], [], 0
        for row, n in zip(freed_rows, freed_counts):
            piece, start = freed_slots[start:start + n], start + n
            if not self._tier_plan.get(row, False):
                self.tier.fallback_tokens += n
                continue
            extra = new_buffers.get(row)
            pieces += [piece] if extra is None else [piece, extra]
            store_rows.append(row)
            store_counts.append(n + (0 if extra is None else int(extra.numel())))
        if store_rows:
            stored = self.tier.store(store_rows, store_counts, torch.cat(pieces), self.compressor.layout.k_buffers,
                                     self.compressor.layout.v_buffers)
            if stored != sum(store_counts):
                raise AssertionError(f"kara recall tier: planned {sum(store_counts)} tokens, stored {stored}")
        self._tier_plan = {}
        if new_buffers:
            self._open_buffers(new_buffers, due)
        if self.debug_checks and self.tp is not None:  # every rank stored and opened the same
            self.tp.check_same("the recall tier's rows and buffers", self.recall.counts, self.buffer_slots,
                               self.buffer_end)

    def _drop_from_tier(self, row: int, n: int) -> None:
        """The horizon: the row's ``n`` oldest tier tokens go; its buffer positions that held
        them know no tier column any more, the others follow their columns' shift."""
        self.tier.drop_oldest(row, n)
        held = self.buffer_held[:, row]
        self.buffer_held[:, row] = torch.where(held >= n, held - n, torch.full_like(held, -1))

    def _open_buffers(self, new_buffers: Dict[int, torch.Tensor], due) -> None:
        """Switch on the recall buffers this compression created (their slots, where they end)."""
        ends = {item.pool_row: item.task.kv_start + item.task.keep for _, item, _, _ in due}
        device = self.buffer_slots.device
        rows = list(new_buffers)
        index = to_device(rows, device)
        self.buffer_slots[index] = torch.stack([new_buffers[r] for r in rows])
        self.buffer_held[:, index] = -1  # its slots hold evicted tokens' exact KV, no tier column
        self.buffer_end[index] = to_device([ends[r] for r in rows], device)
        self.buffer_on[index] = 1
        self.buffer_rows.update(rows)

    def _compress(self, batch: Any, allocator: Any, due) -> None:
        self.compressor.layout = self._layout()
        self._kept_by_row = {e[1].pool_row: e[0] for e in due if e[0].kara.kept is not None}
        if self.swa:  # the regions' SWA peers go first (kara_sglang/swa_window.py)
            for req, item, _, _ in due:
                self.swa_released += swa_window.release_region(
                    req, allocator, self.req_to_token_pool.req_to_token, item.pool_row,
                    item.task.kv_start + item.task.n_keys, item.task.kv_start)
        by_policy: Dict[int, list] = {}
        for entry in due:  # per-request overrides make several policies
            by_policy.setdefault(id(entry[2]), []).append(entry)
        # One step for all policies: under TP, one score all-reduce covers every window.
        freed_slots = self.compressor.run_batches(
            [([e[1] for e in entries], entries[0][2]) for entries in by_policy.values()],
            exact_prefix=self.exact_prefix_by_row)
        if self.debug_checks:
            self._check_free(freed_slots, allocator)
            if self.tp is not None:
                self.tp.check_same("the freed slots and req_to_token rows", freed_slots,
                                   self.req_to_token_pool.req_to_token[[e[1].pool_row for e in due]])
        freed_rows = [row for row, _ in self.compressor.freed_order]
        freed_counts = [n for _, n in self.compressor.freed_order]
        if self.tier is not None:
            # Recall with a tier: the evicted K and V are quantised into it, then freed as always.
            self._store_in_tier(freed_rows, freed_counts, freed_slots, due)
        if self.holds_evicted_slots:
            # Recall (an emulation): the evicted slots stay allocated, held for the request.
            self.recall.hold(freed_rows, freed_counts, freed_slots)
        else:
            kv_pool.free_slots(allocator, freed_slots)
            self.freed_total += int(freed_slots.numel())

        evicted_by_req: Dict[int, int] = {}
        rows, evicted = [], []
        for req, item, policy, task in due:
            window = req.kara.window
            window.apply(task, policy.tail_consumed(task))
            offset = base_evicted(req) + window.evicted
            self.rows_with_evictions += (offset != 0) - (getattr(req, "kara_offset", 0) != 0)
            req.kara_offset = offset
            req.kara.countdown = policy.steps_until_due(window)
            e = task.n_evicted
            req_kv.shorten(req, e)
            if self.swa:
                swa_window.shift(req, e)
            evicted_by_req[id(req)] = e
            rows.append(item.pool_row)
            evicted.append(req.kara_offset)
            if self.swa and self.debug_checks:
                swa_window.check_row(req, allocator, self.req_to_token_pool.req_to_token, item.pool_row,
                                     self.sliding_window)
        # The processed batch, or under overlap the one already prepared from it (the
        # processed one is then a copy without lengths).
        batches = {id(batch): batch}
        prepared = self.overlap.prepared_batch() if self.overlap is not None else None
        if prepared is not None and prepared.reqs:
            batches.setdefault(id(prepared), prepared)
        for b in batches.values():
            if b.seq_lens is None:
                continue
            delta = torch.tensor([evicted_by_req.get(id(r), 0) for r in b.reqs], dtype=torch.int64)
            if bool(delta.any()):
                shrink_seq_lens(b, delta)
        device = self.evicted_by_row.device
        self.evicted_by_row[to_device(rows, device)] = to_device(evicted, device)

    def _record_keep(self, items: List[DueRequest], keep: torch.Tensor) -> None:
        if not any(item.pool_row in self._kept_by_row for item in items):
            return  # nobody tracks: no device read
        for item, row in zip(items, keep.tolist()):
            req = self._kept_by_row.get(item.pool_row)
            if req is None:
                continue
            req.kara.kept.apply(item.task.kv_start - req.kara.window.prompt_len, item.task.n_keys, row,
                                item.task.recall_buffer)

    def _check_free(self, slots: torch.Tensor, allocator: Any) -> None:
        """Debug: every slot freed is distinct, real, and not already free."""
        if slots.unique().numel() != slots.numel():
            raise AssertionError("kara: a slot is freed twice in one compression")
        if bool((slots <= 0).any()):
            raise AssertionError("kara: freeing the reserved slot 0")
        pages = slots // self.page_size if self.page_size > 1 else slots
        # SGLang's allocators keep freed pages in two lists: free_pages, and release_pages
        # (frees waiting to be merged back, sorted, at the next allocation); a hybrid SWA
        # allocator keeps the full-attention side's in its full_attn_allocator.
        allocator = getattr(allocator, "full_attn_allocator", allocator)
        for name in ("free_pages", "release_pages"):
            free = getattr(allocator, name, None)
            if isinstance(free, torch.Tensor) and free.numel() and bool(torch.isin(pages.to(free.device), free).any()):
                raise AssertionError(f"kara: freeing a slot that is already free (in the allocator's {name})")

    # --------------------------------------------------------------- admission
    def growth_bound(self, req: Any) -> float:
        """Most KV tokens ``req`` can still add before it finishes."""
        remaining = max(0, req.sampling_params.max_new_tokens - len(req.output_ids))
        state: Optional[RequestKV] = getattr(req, "kara", None)
        if state is None:
            try:
                policy, window = self.policy_for(req), WindowState(prompt_len=0)
            except KaraConfigError:
                # Refused on arrival (bad custom_params): it is being aborted, and SGLang may
                # still pass it through admission; reserve for it as vanilla would.
                return float(remaining)
        else:
            policy, window = state.policy, state.window
        if policy is None or self.holds_evicted_slots:
            return float(remaining)  # the emulation holds every evicted slot: it grows as vanilla does
        buffer = self.config.recall_tokens if self.tier is not None else 0  # a recall buffer's columns
        return float(min(remaining, policy.max_growth(window, remaining) + buffer))

    # ----------------------------------------------------------- observability
    def counters(self) -> dict:
        stats = self.compressor.stats
        out = {"compression_events": stats.events, "tokens_evicted": stats.tokens_evicted,
               "kv_slots_freed": self.freed_total, "requests_compressed": self.rows_with_evictions,
               "recall_slots_held": self.recall.held if self.holds_evicted_slots else 0,
               **(self._tier_counters() if self.tier is not None else {}),
               **self.overhead.totals()}
        if self.swa:
            out["swa_peers_released"] = self.swa_released
        if self.tp is not None:
            out.update(self.tp.counters())
        return out

    def _tier_counters(self) -> dict:
        picks, written = self.buffer_picks.tolist()  # one device read for both
        return {"recall_tier_tokens_held": self.tier.held, "recall_tier_tokens_stored": self.tier.stored_tokens,
                "recall_tier_fallback_tokens": self.tier.fallback_tokens,
                "recall_tier_dropped_tokens": self.tier.dropped_tokens, "recall_tier_pages_held": self.tier.pages_held,
                "recall_buffers": len(self.buffer_rows),
                "recall_buffer_fills": int(self.buffer_fills.item()),
                "recall_buffer_picks": picks, "recall_buffer_picks_written": written}

    @property
    def holds_evicted_slots(self) -> bool:
        """The recall emulation: evicted pool slots stay allocated, owned by no row of SGLang's."""
        return self.recall is not None and self.tier is None

    def report(self, log: bool, metrics: bool, dp_rank: int = 0) -> None:
        stats = self.compressor.stats
        if log:
            logger.info("kara: compressions %d, tokens evicted %d, KV slots freed %d, "
                        "requests holding compressed KV %d", stats.events, stats.tokens_evicted,
                        self.freed_total, self.rows_with_evictions)
        if metrics:
            self._export(stats, str(dp_rank))

    def _export(self, stats, dp_rank: str) -> None:
        if not hasattr(self, "_metrics"):
            from prometheus_client import Counter, Gauge

            # One series per data-parallel replica (each has its own scheduler and runtime).
            self._metrics = (
                Counter("kara:compression_events", "KV compressions run", ["dp_rank"]).labels(dp_rank),
                Counter("kara:tokens_evicted", "KV tokens evicted by compression", ["dp_rank"]).labels(dp_rank),
                Gauge("kara:requests_compressed", "running requests holding compressed KV", ["dp_rank"],
                      multiprocess_mode="mostrecent").labels(dp_rank),
            )
            self._exported = (0, 0)
        events, evicted, running = self._metrics
        events.inc(stats.events - self._exported[0])
        evicted.inc(stats.tokens_evicted - self._exported[1])
        running.set(self.rows_with_evictions)
        self._exported = (stats.events, stats.tokens_evicted)

    @staticmethod
    def kv_counts(req: Any) -> Optional[Tuple[int, int]]:
        """(KV tokens kept, evicted) of a request: one value per output token, from the first.

        Before its first decode step a request holds its prefilled KV, nothing evicted; the
        value must exist then too, because a streaming request's first token is sent right
        after prefill and SGLang forwards only values from each send's offset on.
        """
        state: Optional[RequestKV] = getattr(req, "kara", None)
        if state is not None:
            return state.window.kv_len, base_evicted(req) + state.window.evicted
        released = getattr(req, "kara_kv", None)  # set at release
        if released is not None:
            return released
        return (req_kv.committed_len(req) if req_kv.pool_row(req) is not None else 0), base_evicted(req)

    # ----------------------------------------------------------------- release
    def before_release(self, req: Any, allocator: Any) -> None:
        """Give the radix tree only the exact prefix of a compressed request; free the rest.

        Runs before SGLang's ``release_kv_cache`` (finish, abort, retraction). The tree
        assumes column ``j`` of the request's row holds token ``j``; after compression that
        holds for the prompt and for the leading decode tokens its compressions kept in place
        (the longest exact prefix), so the row is cut there and the rest is freed. The
        next turn of a conversation (or a retracted request's re-prefill) matches that much.
        A turn that continues its streaming session (``kara_session_continue``) and finished
        keeps its whole row instead, for the session's next turn.
        """
        state: Optional[RequestKV] = getattr(req, "kara", None)
        row = req_kv.pool_row(req)
        if row is not None:
            self.set_offset(req, row, 0)  # the row leaves the running batch
            if self.tier is not None:
                if self.tier.release(row) and self.debug_checks:
                    self.tier.check_free_once()
                if row in self.buffer_rows:  # its slots are columns of the row: freed below
                    self.buffer_rows.discard(row)
                    self.buffer_on[row] = 0
            elif self.recall is not None and self.recall.count(row):
                held = self.recall.release(row)
                if self.debug_checks:
                    self._check_free(held, allocator)
                allocator.free(held)
        if state is not None and getattr(req, "kara_offloaded", None) is not None and row is not None:
            # Retracted on a PD decode server, its kept KV on the host: it resumes with this
            # state (kara_sglang/decode_offload.py); SGLang frees its whole row.
            return
        req.kara = None
        if row is None:
            return
        prompt_history: Optional[session_continue.History] = getattr(req, "kara_prompt_history", None)
        # The last step's token is counted by SGLang (released before after_decode sees it);
        # under overlap SGLang's count may also hold the slot of a step that will not run.
        end = req_kv.committed_len(req)
        if state is None:
            if prompt_history is not None and not self._finished(req):
                # A continued turn leaving before its first decode step (abort, retraction).
                self._cut(req, row, min(end, prompt_history.exact_len), end, allocator)
            return
        if state.kept is not None and self.kept_block is not None:
            req.kara_kept_blocks = state.kept.per_block(self.kept_block)
        evicted = base_evicted(req) + state.window.evicted
        req.kara_kv = (min(end, state.window.kv_len + 1), evicted)
        if state.continues and self._finished(req) and evicted:
            self._keep_for_session(req, state, row, end, allocator)
            return
        exact = end
        if state.window.evicted:
            # One small device read per finished compressed request (the batch's results
            # were already read to the host, so the GPU is not running ahead of it here).
            exact = int(self.exact_prefix_by_row[row].item())
            if not state.window.prompt_len <= exact <= end:
                raise AssertionError(f"kara: exact prefix {exact} outside [{state.window.prompt_len}, {end}]")
        if prompt_history is not None:
            exact = min(exact, prompt_history.exact_len)  # the compressed history is not exact either
        self._cut(req, row, exact, end, allocator)

    @staticmethod
    def _finished(req: Any) -> bool:
        """Finished for good (length, stop): not aborted, not retracted."""
        from sglang.srt.managers.schedule_batch import FINISH_ABORT

        reason = req.finished_reason
        return reason is not None and not isinstance(reason, FINISH_ABORT)

    def _keep_for_session(self, req: Any, state: RequestKV, row: int, end: int, allocator: Any) -> None:
        """Leave the compacted row to the streaming session, with its KV-space conversation."""
        output = req.output_ids[: req.sampling_params.max_new_tokens]  # what the session appends
        prompt_history = getattr(req, "kara_prompt_history", None)
        prompt_positions = None
        if prompt_history is not None:
            prompt_positions = [prompt_history.position(c) for c in range(len(req.origin_input_ids))]
        history = session_continue.after_turn(
            req.origin_input_ids, prompt_positions, output, state.kept.decode_index, state.kept.decoded,
            base_evicted(req) + state.window.evicted)
        # As vanilla, the session holds every token's KV but the last one's (the next turn
        # prefills it); SGLang's own finish clamp counts token-space lengths, so cut here.
        self._cut(req, row, min(end, len(history.ids) - 1), end, allocator)
        req.kara_history = history

    def _cut(self, req: Any, row: int, length: int, end: int, allocator: Any) -> None:
        """Free the row's whole pages past ``length`` and set the request's lengths to it."""
        if length >= end:
            return
        first = page_ceil(length, self.page_size)  # whole pages past the kept prefix
        if end > first:
            slots = self.req_to_token_pool.req_to_token[row, first:end].to(torch.int64)
            if self.page_size > 1:
                slots = slots[:: self.page_size]  # one slot names each whole page
            if self.debug_checks:
                self._check_free(slots, allocator)
            kv_pool.free_slots(allocator, slots)
        req_kv.cut_to(req, length)
        swa_window.clamp(req, length)


def shrink_seq_lens(batch: Any, delta: torch.Tensor) -> None:
    """Take ``delta[i]`` evicted tokens off request ``i``'s lengths in ``batch`` (int64, host)."""
    on_device = to_device(delta, batch.seq_lens.device)
    # New tensors, as SGLang itself does, so nothing holding the old ones (a step in
    # flight) sees a change.
    batch.seq_lens = batch.seq_lens - on_device.to(batch.seq_lens.dtype)
    batch.seq_lens_cpu = batch.seq_lens_cpu - delta.to(batch.seq_lens_cpu.dtype)
    if getattr(batch, "orig_seq_lens", None) is not None:
        batch.orig_seq_lens = batch.orig_seq_lens - on_device.to(batch.orig_seq_lens.dtype)
    batch.seq_lens_sum = None  # SGLang recomputes it from seq_lens_cpu (ForwardBatch.init_new)


def install(config: KaraConfig, model_runner: Any, page_size: int,
            reasoning_end: Optional[ReasoningEnd] = None, overlap: Optional[OverlapView] = None) -> KaraRuntime:
    global _RUNTIME
    _RUNTIME = KaraRuntime(config, model_runner, page_size, reasoning_end, overlap)
    return _RUNTIME
