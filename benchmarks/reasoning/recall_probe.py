"""Can evicted KV be recalled in time? A teacher-forced probe of recall digests (issue 28 step 1).

    python benchmarks/reasoning/recall_probe.py --model DIR --n 500 --seconds 540 --out recall.json
    python benchmarks/reasoning/recall_probe.py --report recall.json

A sibling of score_probe.py (its capture, tokenization, schedule and Kara keep sets): for each
held-out ledger problem, one full-KV forward records every layer's post-RoPE queries and keys;
Kara's keep sets at each keep ratio (W, U, Token2Chunk γ, the server's scorer) say, for every
query position t, which earlier tokens are resident and which were evicted (a window's dropped
tokens from its compression on). Recall adds back, per query, the top R evicted tokens ranked
by a digest:

  exact      oracle: q·k with the real keys
  quest16/32 Quest page bounds: the evicted tokens of a window, in position order, cut into pages
             of 16/32 (so a page holds only evicted tokens); a page's score is
             sum_d max(q_d min_d, q_d max_d) over its keys' per-channel min/max (an upper bound of
             q·k for every key in it); whole pages are taken while they fit R tokens
  bits2/3/4  q·k' with k' the key quantised per token and KV head, asymmetric min/max in
             groups of --bits-group channels (default 32: two scale/zero pairs per 64-wide head),
             round to nearest
  quest16+bits4  two stages: the Quest-16 bound picks the best pages, --prefilter-tokens of
             them (default 1024), and only their tokens are ranked, by 4-bit keys (the GPU
             tier ranks every evicted token each step; this ranks a fixed few pages' worth)

Scopes: ``layer`` selects per (layer, KV head): a token's score is the max over the GQA group's
query heads (a sharp lookup by any head counts); ``shared`` selects once for every layer and
head: each of --shared-layers' (default: Kara's vote layers) (layer, KV head) scores becomes a
softmax over the candidates (logits / sqrt(D)), summed; the top R serve all layers. (At lag 0 a
shared selection from late layers could not serve the earlier layers of the same step in a real
system; at lag 1 it could.)

What is measured, per style, keep ratio, digest, scope and R in 16..512 (tokens):
  - recall@R over the reads whose value is evicted (no copy of the balance fully resident when
    the read is written): digit i of the read is predicted by the query at (its position - 1);
    it needs the corresponding digit of some copy resident or selected; ``need`` = the smallest
    R whose selection holds, for every digit, the same copy's digit (min over copies of the max
    over digits; 0 when resident). Layer scope: weighted by the attention the full-KV model's
    read query pays that (layer, KV head)'s copy digits (max over the group's heads, summed over
    digits): the share of the lookup's attention whose keys come back. Lag 1: the selection of
    the query one step earlier.
  - lead time: steps k before the read over which the value was continuously in the top R
    (the selection k steps earlier holds it, for every k' <= k; -1: not even at the read;
    capped at --horizon); layer scope: the (layer, KV head) paying the most attention.
  - fetch traffic: tokens per step per (layer, KV head) that the top R holds and the previous
    step's top R did not (a host tier keeps last step's selection on the GPU and fetches the
    rest), over step pairs sampled every --churn-stride steps; bytes = that x 2 (K, V) x head
    size x 2 (bf16) x layers x KV heads per output token.
  - masked forwards (--forwards, a chosen few: each is a full forward): every query of layer l
    and KV head g attends to its resident set plus its selection (lag 0: its own query's; lag 1:
    the previous position's); reads right, reads with an evicted value right, the queried
    account's reads all right (what the answer needs), every digit right; plain Kara (R = 0)
    and full KV as references.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ledger  # noqa: E402
import score_probe as sp  # noqa: E402
from train import EVAL_SEED0  # noqa: E402

from kara_sglang.accuracy.stats import wilson_interval  # noqa: E402
from kara_sglang.config import KaraConfig  # noqa: E402
from kara_sglang.token2chunk import token2chunk  # noqa: E402

DIGESTS = ("exact", "quest16", "quest32", "bits2", "bits3", "bits4", "quest16+bits4")
SCOPES = ("layer", "shared")
R_GRID = (16, 32, 64, 128, 256, 512, 1024, 2048)  # 1024+: how many tokens a page stage must keep
NEVER = 1 << 40  # evict time of a token that is never evicted
INF = 1 << 30  # need of a value that no selection of that query holds
DEFAULT_FORWARDS = ("exact/layer@0.25:64:0,exact/layer@0.25:256:0,exact/layer@0.25:256:1,"
                    "quest16/layer@0.25:256:1,bits2/layer@0.25:256:1,exact/shared@0.25:256:1,"
                    "exact/layer@0.125:256:0,exact/layer@0.125:256:1")


def page_size(digest: str) -> int:
    """Tokens per selected candidate: a Quest page, or 1 (a two-stage digest selects tokens)."""
    return int(digest[5:]) if digest.startswith("quest") and "+" not in digest else 1


def prefilter_page(digest: str) -> int:
    """Page size of a two-stage digest's first stage (``questP+bitsB``), else 0."""
    return int(digest[5:digest.index("+")]) if "+" in digest else 0


def quantize(k: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Keys after per-token asymmetric ``bits``-bit quantisation in groups of ``group`` channels
    (min/max scale and zero per group, round to nearest), dequantised."""
    shape = k.shape
    g = k.float().reshape(*shape[:-1], shape[-1] // group, group)
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    scale = ((hi - lo) / (2 ** bits - 1)).clamp_min(1e-8)
    return (((g - lo) / scale).round().clamp(0, 2 ** bits - 1) * scale + lo).reshape(shape)


@dataclass
class Schedule:
    """Kara's eviction on one problem at one keep ratio."""

    evict: torch.Tensor  # [T] long: the position from which each token is evicted (NEVER: resident)
    first_due: int  # first query position with anything evicted (T: none)
    pages: Dict[int, Tuple[torch.Tensor, torch.Tensor]]  # P -> (positions [n, P] (-1 pad), due [n])


def kara_schedule(cap: "sp.Captured", T: int, prompt_len: int, window: int, buffer: int, keep: float,
                  chunk_size: int, chunk_fraction: float, page_sizes: Sequence[int] = (16, 32)) -> Schedule:
    """The keep sets of score_probe's ``kara`` setting, as evict times and pages of evicted tokens."""
    device = cap.q.device
    wins = sp.windows(prompt_len, T, window, buffer)
    evict = torch.full((T,), NEVER, dtype=torch.long, device=device)
    pages: Dict[int, Tuple[list, list]] = {p: ([], []) for p in page_sizes}
    if not wins:
        return Schedule(evict, T, {p: (torch.zeros(0, p, dtype=torch.long, device=device),
                                       torch.zeros(0, dtype=torch.long, device=device)) for p in page_sizes})
    vote_layers = KaraConfig().resolve_vote_layers(cap.q.shape[0])
    scores = sp.score_windows("kara", cap, wins, window, buffer, vote_layers, seed=0)
    cfg = KaraConfig(window=window, buffer=buffer, keep_ratio=keep, chunk_size=chunk_size,
                     chunk_fraction=chunk_fraction)
    kept = token2chunk(scores, cfg.window_budget, cfg.chunk_size, cfg.num_chunks)
    for w, (start, due) in enumerate(wins):
        dropped = torch.ones(window, dtype=torch.bool, device=device)
        dropped[kept[w]] = False
        cols = torch.arange(start, start + window, device=device)[dropped]
        evict[cols] = due
        for P in page_sizes:  # consecutive runs of P evicted tokens, the window's last one padded with -1
            rows = torch.full((-(-cols.numel() // P) * P,), -1, dtype=torch.long, device=device)
            rows[:cols.numel()] = cols
            pages[P][0].append(rows.view(-1, P))
            pages[P][1].append(torch.full((rows.numel() // P,), due, dtype=torch.long, device=device))
    return Schedule(evict, wins[0][1], {P: (torch.cat(rows), torch.cat(dues)) for P, (rows, dues) in pages.items()})


def resident_mask(evict: torch.Tensor) -> torch.Tensor:
    """``[T, T]`` bool: query t sees token j (causal, not evicted at t). Equals
    score_probe.compressed_mask for the same keep sets."""
    T = evict.numel()
    t = torch.arange(T, device=evict.device)
    return (t[None, :] <= t[:, None]) & (evict[None, :] > t[:, None])


class Digest:
    """Scores of evicted candidates (tokens, or pages for Quest) for a set of query rows."""

    def __init__(self, name: str, cap: "sp.Captured", sched: Schedule, bits_group: int = 32,
                 prefilter_tokens: int = 1024) -> None:
        self.name, self.cap, self.sched = name, cap, sched
        self.P = page_size(name)
        self.pre_P = prefilter_page(name)
        self.pre_pages = prefilter_tokens // self.pre_P if self.pre_P else 0
        L, Hkv, T, D = cap.k.shape
        self.group = cap.q.shape[1] // Hkv
        if self.P > 1 or self.pre_P:
            pos, due = sched.pages[self.P if self.P > 1 else self.pre_P]
            self.page_pos, self.page_due = pos, due  # page c available to queries t >= page_due[c]
            k = cap.k.float()[:, :, pos.clamp_min(0)]  # [L, Hkv, n, P, D]
            valid = (pos >= 0)[None, None, :, :, None]
            self.kmax = k.masked_fill(~valid, float("-inf")).amax(3)
            self.kmin = k.masked_fill(~valid, float("inf")).amin(3)
            # the page of each token (-1: in none)
            self.page_of = torch.full((T,), -1, dtype=torch.long, device=pos.device)
            rows = torch.arange(pos.shape[0], device=pos.device)[:, None].expand_as(pos)
            self.page_of[pos[pos >= 0]] = rows[pos >= 0]
            self.page_len = (pos >= 0).sum(1)
        if self.P > 1:
            self.cand_time = self.page_due  # candidate c available to queries t >= cand_time[c]
        else:
            self.cand_time = sched.evict
            bits = name[name.index("bits") + 4:] if "bits" in name else ""
            self.keys = quantize(cap.k, int(bits), bits_group) if bits else cap.k.float()

    @property
    def n_cand(self) -> int:
        return self.cand_time.numel()

    def layer_scores(self, layer, rows: torch.Tensor) -> torch.Tensor:
        """``[n_layers * Hkv, n, C]`` (layer-major; ``layer`` an int or a list): max over each KV
        group's query heads of each candidate's score for the queries at ``rows`` (-inf where not
        a candidate of that query: not evicted yet)."""
        layers = [layer] if isinstance(layer, int) else list(layer)
        q = self.cap.q[layers][:, :, rows].float().flatten(0, 1)  # [nl * Hq, n, D]
        if self.P > 1:
            return self._page_bounds(q, layers, rows)
        s = torch.einsum("hnd,hcd->hnc", q, self.keys[layers].repeat_interleave(self.group, 1).flatten(0, 1))
        s = s.view(-1, self.group, *s.shape[1:]).amax(1)
        s = s.masked_fill(self.cand_time[None, None, :] > rows[None, :, None], float("-inf"))
        if self.pre_P:
            # Only tokens of the query's best pre_pages pages (by their bound) are ranked.
            bounds = self._page_bounds(q, layers, rows)  # [H, n, pages]
            val, idx = bounds.topk(min(self.pre_pages, bounds.shape[-1]), dim=-1)
            chosen = torch.zeros_like(bounds, dtype=torch.bool).scatter_(-1, idx, val > float("-inf"))
            page = self.page_of.clamp_min(0).view(1, 1, -1).expand(*chosen.shape[:2], -1)
            in_chosen = chosen.gather(-1, page) & (self.page_of >= 0)
            s = s.masked_fill(~in_chosen, float("-inf"))
        return s

    def _page_bounds(self, q: torch.Tensor, layers: List[int], rows: torch.Tensor) -> torch.Tensor:
        """Quest bounds ``[n_layers * Hkv, n, pages]`` (max over each KV group's query heads;
        -inf for pages not yet evicted at the query)."""
        kmax = self.kmax[layers].repeat_interleave(self.group, 1).flatten(0, 1)
        kmin = self.kmin[layers].repeat_interleave(self.group, 1).flatten(0, 1)
        s = torch.einsum("hnd,hcd->hnc", q.clamp_min(0), kmax) + torch.einsum("hnd,hcd->hnc", q.clamp_max(0), kmin)
        s = s.view(-1, self.group, *s.shape[1:]).amax(1)
        return s.masked_fill(self.page_due[None, None, :] > rows[None, :, None], float("-inf"))

    def shared_scores(self, layers: Sequence[int], rows: torch.Tensor) -> torch.Tensor:
        """``[1, n, C]``: the sum over ``layers`` and KV heads of softmax(score / sqrt(D))."""
        D = self.cap.q.shape[-1]
        total = (self.layer_scores(list(layers), rows) / math.sqrt(D)).softmax(-1).nan_to_num(0.0).sum(0)
        return total.masked_fill(self.cand_time[None, :] > rows[:, None], float("-inf"))[None]

    def scores(self, scope: str, layers, rows: torch.Tensor, shared_layers: Sequence[int]) -> torch.Tensor:
        """Layer scope: ``[len(layers) * Hkv, n, C]``; shared: ``[1, n, C]`` (``layers`` unused)."""
        return self.layer_scores(layers, rows) if scope == "layer" else self.shared_scores(shared_layers, rows)

    def layer_groups(self, scope: str, n_rows: int, budget: int) -> List[List[int]]:
        """Layers scored together so that a score tensor stays under ``budget`` elements."""
        if scope != "layer":
            return [[0]]
        L, Hq = self.cap.q.shape[:2]
        per = max(1, budget // max(1, Hq * n_rows * self.n_cand))
        return [list(range(i, min(L, i + per))) for i in range(0, L, per)]

    def top_tokens(self, s: torch.Tensor, rows: torch.Tensor, R: int) -> torch.Tensor:
        """Token positions of the top candidates fitting ``R`` tokens, ``[H, n, <=R]``; slots
        without a candidate hold the query's own position (always visible)."""
        k = min(R // self.P, s.shape[-1])
        if k == 0:
            return rows.view(1, -1, 1).expand(s.shape[0], -1, 1).clone()
        val, idx = s.topk(k, dim=-1)
        if self.P > 1:
            tok = self.page_pos[idx].flatten(-2)  # [H, n, k * P]
            bad = ((val == float("-inf"))[..., None].expand(*val.shape, self.P).flatten(-2)) | (tok < 0)
        else:
            tok, bad = idx, val == float("-inf")
        return torch.where(bad, rows.view(1, -1, 1).expand_as(tok), tok)


def selections(dig: Digest, scope: str, R: int, T: int, shared_layers: Sequence[int], block: int = 1024,
               budget: int = 1 << 28) -> torch.Tensor:
    """Every query's selection: ``[L, Hkv, T, <=R]`` (``[1, 1, T, <=R]`` shared) int32 positions."""
    L, Hkv = dig.cap.k.shape[:2]
    first = min(dig.sched.first_due, T)
    device = dig.cand_time.device
    out = []
    for layers in dig.layer_groups(scope, min(block, T), budget):
        parts = [torch.arange(first, device=device).view(1, -1, 1)]  # before anything is evicted: own position
        for r0 in range(first, T, block):
            rows = torch.arange(r0, min(T, r0 + block), device=device)
            parts.append(dig.top_tokens(dig.scores(scope, layers, rows, shared_layers), rows, R))
        width = max(p.shape[-1] for p in parts)
        H = max(p.shape[0] for p in parts)
        parts = [torch.cat([p.expand(H, -1, -1), p[..., :1].expand(H, -1, width - p.shape[-1])], -1) for p in parts]
        sel = torch.cat(parts, 1).to(torch.int32)
        out.append(sel.view(len(layers), -1, *sel.shape[1:]) if scope == "layer" else sel[None])
    return torch.cat(out)


# --------------------------------------------------------------------------- masked forward


def selection_source(T: int, lag) -> torch.Tensor:
    """The position whose selection query ``t`` uses (-1: none): ``t - L`` for a lag ``L``, or
    ``t - t % K`` for ``"eK"`` (a selection refreshed every K steps and reused in between, as a
    server that ranks every K-th step would)."""
    t = torch.arange(T)
    lag = str(lag)
    if lag.startswith("e"):
        return t - t % int(lag[1:])
    src = t - int(lag)
    return torch.where(src >= 0, src, -1)


def lag_label(lag) -> str:
    """``lag0``, ``lag1`` ...; ``every4`` for a selection refreshed every 4 steps."""
    return f"every{str(lag)[1:]}" if str(lag).startswith("e") else f"lag{lag}"


def setting_mask(resident: torch.Tensor, sel: Optional[torch.Tensor], layer: int, lag, Hkv: int) -> torch.Tensor:
    """``[Hkv, T, T]`` bool for one layer: resident, plus each query's selection (``sel``
    ``[L or 1, Hkv or 1, T, R]``) made at the position :func:`selection_source` names."""
    T = resident.shape[0]
    allowed = resident.expand(Hkv, T, T).clone()
    if sel is None:
        return allowed
    idx = sel[layer if sel.shape[0] > 1 else 0].long().expand(Hkv, -1, -1)
    if str(lag) != "0":
        src = selection_source(T, lag).to(idx.device)
        pos = torch.arange(T, device=idx.device).view(1, -1, 1).expand_as(idx)
        # No earlier selection: the query's own position (resident anyway) stands in.
        idx = torch.where((src >= 0).view(1, -1, 1), idx[:, src.clamp(min=0)], pos)
    return allowed.scatter_(-1, idx, True)


class _RecallAttention:
    """Stands in for transformers' ``sdpa`` attention: per layer, a ``[B * Hkv, 1, T, T]``
    bias (one mask per batch element and KV head, shared by the group's query heads)."""

    def __init__(self, masks) -> None:
        self.masks = masks  # layer -> [B, Hkv, T, T] bool

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **_kw):
        B, Hq, T, D = query.shape
        Hkv = key.shape[1]
        allowed = self.masks(module.layer_idx)
        bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        bias.masked_fill_(~allowed, torch.finfo(query.dtype).min)
        q = query.reshape(B * Hkv, Hq // Hkv, T, D)
        k = key.reshape(B * Hkv, 1, T, D).expand(-1, Hq // Hkv, -1, -1).contiguous()
        v = value.reshape(B * Hkv, 1, T, D).expand(-1, Hq // Hkv, -1, -1).contiguous()
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias.view(B * Hkv, 1, T, T),
                                                               scale=scaling)
        return out.reshape(B, Hq, T, D).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def recall_attention(masks):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    had = "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
    old = ALL_ATTENTION_FUNCTIONS._local_mapping.get("sdpa")
    ALL_ATTENTION_FUNCTIONS["sdpa"] = _RecallAttention(masks)
    try:
        yield
    finally:
        if had:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = old
        else:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]


def recall_logits(model, ids: torch.Tensor, resident: torch.Tensor,
                  settings: Sequence[Tuple[Optional[torch.Tensor], int]], positions: Optional[torch.Tensor] = None):
    """Logits ``[B, n, vocab]`` at ``positions`` (default: all) of one batched forward, batch
    element b masked by ``settings[b] = (selection or None, lag)``."""
    Hkv = model.config.num_key_value_heads

    def masks(layer: int) -> torch.Tensor:
        return torch.stack([setting_mask(resident, sel, layer, lag, Hkv) for sel, lag in settings])

    B = len(settings)
    with torch.no_grad(), recall_attention(masks):
        hidden = model.model(input_ids=ids[None].expand(B, -1)).last_hidden_state
        if positions is not None:
            hidden = hidden[:, positions]
        return model.lm_head(hidden)


# --------------------------------------------------------------------------- reads and rankings


@dataclass
class HardReads:
    """The reads whose value is evicted when written, with their digit queries and copies."""

    index: List[int]  # into Encoded.reads
    digit_rows: List[List[int]]  # per read: the query position predicting each digit
    copies: List[List[List[int]]]  # per read: per copy, the copy token paired with each digit


def hard_reads(enc: "sp.Encoded", evict: torch.Tensor) -> HardReads:
    ev = evict.tolist()
    out = HardReads([], [], [])
    for r, (digits, sources) in enumerate(zip(enc.reads, enc.sources)):
        rows = [d - 1 for d in digits]
        copies = [[c[min(i, len(c) - 1)] for i in range(len(digits))] for c in sources if c]
        if not copies:
            continue
        if any(all(ev[tok] > row for tok, row in zip(copy, rows)) for copy in copies):
            continue  # some copy is resident: nothing to recall
        out.index.append(r), out.digit_rows.append(rows), out.copies.append(copies)
    return out


def value_mass(cap: "sp.Captured", hr: HardReads, evict: torch.Tensor) -> torch.Tensor:
    """``[reads, L, Hkv]``: the full-KV attention each read's digit queries pay the evicted copy
    digits (per query head, summed over copies; max over the group's heads; summed over digits)."""
    L, Hq, T, D = cap.q.shape
    Hkv = cap.k.shape[1]
    device = cap.q.device
    rows, owner, weight_cols = [], [], []
    for n, (drows, copies) in enumerate(zip(hr.digit_rows, hr.copies)):
        for i, row in enumerate(drows):
            rows.append(row), owner.append(n)
            weight_cols.append([c[i] for c in copies if int(evict[c[i]]) <= row])
    out = torch.zeros(len(hr.index), L, Hkv, device=device)
    if not rows:
        return out
    rows_t = torch.tensor(rows, device=device)
    ind = torch.zeros(len(rows), T, device=device)
    for j, cols in enumerate(weight_cols):
        ind[j, cols] = 1.0
    causal = torch.arange(T, device=device)[None, :] > rows_t[:, None]
    owner_t = torch.tensor(owner, device=device)
    for layer in range(L):
        k = cap.k[layer].float().repeat_interleave(Hq // Hkv, 0)
        logits = torch.einsum("hnd,htd->hnt", cap.q[layer][:, rows_t].float(), k) / math.sqrt(D)
        w = logits.masked_fill(causal[None], float("-inf")).softmax(-1)
        mass = (w * ind[None]).sum(-1).view(Hkv, Hq // Hkv, -1).amax(1)  # [Hkv, nrows]
        out[:, layer].index_add_(0, owner_t, mass.T)
    return out


def value_need(dig: Digest, scope: str, hr: HardReads, horizon: int, shared_layers: Sequence[int],
               block: int = 2048, budget: int = 1 << 28) -> torch.Tensor:
    """``[reads, L or 1, Hkv or 1, horizon + 1]``: the smallest R whose selection made k steps
    before each digit's query holds a whole copy (0: resident at the read; INF: none)."""
    cap, evict = dig.cap, dig.sched.evict
    device = evict.device
    L, Hkv = cap.k.shape[:2]
    ev = evict.tolist()
    # one entry per (read, copy, digit, k): query row, copy token, and whether it is resident at the read
    e_read, e_copy, e_k, e_row, e_tok, e_res = [], [], [], [], [], []
    for n, (drows, copies) in enumerate(zip(hr.digit_rows, hr.copies)):
        for c, copy in enumerate(copies):
            for row, tok in zip(drows, copy):
                for k in range(horizon + 1):
                    e_read.append(n), e_copy.append(c), e_k.append(k)
                    e_row.append(row - k), e_tok.append(tok), e_res.append(ev[tok] > row)
    nL, nH = (L, Hkv) if scope == "layer" else (1, 1)
    n_copies = max((len(c) for c in hr.copies), default=1)
    if not e_read:
        return torch.zeros(0, nL, nH, horizon + 1, dtype=torch.long, device=device)
    e_row_t = torch.tensor(e_row, device=device).clamp_min(0)
    e_tok_t = torch.tensor(e_tok, device=device)
    cand = dig.page_of[e_tok_t] if dig.P > 1 else e_tok_t
    avail = (cand >= 0) & (dig.cand_time[cand.clamp_min(0)] <= e_row_t)  # a candidate of that query
    rows_u, inv = torch.unique(e_row_t, return_inverse=True)
    ent_need = torch.full((len(e_row), nL * nH), INF, dtype=torch.long, device=device)
    for layers in dig.layer_groups(scope, min(block, rows_u.numel()), budget):
        cols = slice(layers[0] * nH, (layers[-1] + 1) * nH)
        for b0 in range(0, rows_u.numel(), block):
            rows = rows_u[b0:b0 + block]
            s = dig.scores(scope, layers, rows, shared_layers)  # [H, n, C]
            sel = ((inv >= b0) & (inv < b0 + rows.numel())).nonzero().flatten()
            step = max(1, budget // (s.shape[0] * s.shape[-1]))
            for e0 in range(0, sel.numel(), step):
                e = sel[e0:e0 + step]
                srow = s[:, inv[e] - b0]  # [H, ne, C]
                mine = srow.gather(-1, cand[e].clamp_min(0).view(1, -1, 1).expand(srow.shape[0], -1, 1))
                rank = (srow > mine).sum(-1)  # [H, ne]
                # pages: whole pages are taken while they fit, so a page is in iff its rank < R // P
                got = (rank + 1) * dig.P
                # a two-stage digest leaves tokens outside its chosen pages at -inf: never selected
                got = torch.where(avail[e][None] & (mine[..., 0] > float("-inf")), got, torch.full_like(got, INF))
                ent_need[e, cols] = got.T
    ent_need[torch.tensor(e_res, device=device)] = 0
    # max over a copy's digits, then min over copies (copies a read lacks stay INF)
    K = horizon + 1
    key = ((torch.tensor(e_read, device=device) * n_copies + torch.tensor(e_copy, device=device)) * K
           + torch.tensor(e_k, device=device))
    per_copy = torch.full((len(hr.index) * n_copies * K, nL * nH), -1, dtype=torch.long, device=device)
    per_copy.scatter_reduce_(0, key[:, None].expand(-1, nL * nH), ent_need, "amax")
    per_copy[per_copy < 0] = INF
    per_copy = per_copy.view(len(hr.index), n_copies, K, nL, nH)
    return per_copy.min(1).values.permute(0, 2, 3, 1)  # [reads, L, H, k]


def churn(dig: Digest, scope: str, T: int, stride: int, shared_layers: Sequence[int],
          grid: Sequence[int] = R_GRID, budget: int = 1 << 28) -> Tuple[torch.Tensor, int]:
    """Summed over sampled step pairs (t - 1, t) and (layer, KV head): tokens in the top R at t
    not in the top R at t - 1, per R in ``grid``; and the number of (t, layer, head) samples."""
    first = dig.sched.first_due
    device = dig.cand_time.device
    ts = torch.arange(first + 1, T, stride, device=device)
    new = torch.zeros(len(grid), dtype=torch.long, device=device)
    if ts.numel() == 0:
        return new, 0
    L, Hkv = dig.cap.k.shape[:2]
    samples = 0
    for layers in dig.layer_groups(scope, 2 * min(512, ts.numel()), budget):
        for b0 in range(0, ts.numel(), 512):
            t = ts[b0:b0 + 512]
            rows = torch.stack([t - 1, t], 1).flatten()
            s = dig.scores(scope, layers, rows, shared_layers)  # [H, 2n, C]
            H, _, C = s.shape
            k = min(max(grid) // dig.P, C)
            val, idx = s.topk(k, dim=-1)
            val = val.view(H, -1, 2, k)
            idx = idx.view(H, -1, 2, k)
            # rank of each candidate at t - 1 (k: not in the top k)
            prev_rank = torch.full((H, idx.shape[1], C), k, dtype=torch.long, device=device)
            ok_prev = val[:, :, 0] > float("-inf")
            prev_rank.scatter_(-1, idx[:, :, 0], torch.where(ok_prev, torch.arange(k, device=device).expand_as(ok_prev), k))
            ok_now = val[:, :, 1] > float("-inf")
            r_prev_of_now = prev_rank.gather(-1, idx[:, :, 1])  # [H, n, k]
            size = dig.page_len[idx[:, :, 1]] if dig.P > 1 else torch.ones_like(idx[:, :, 1])
            pos = torch.arange(k, device=device)
            for gi, R in enumerate(grid):
                kk = R // dig.P
                if kk == 0:
                    continue
                fresh = ok_now & (pos < kk) & (r_prev_of_now >= kk)
                new[gi] += (fresh * size).sum()
            samples += H * t.numel()
    return new, samples


# --------------------------------------------------------------------------- one problem


def parse_forwards(text: str) -> List[Tuple[str, str, float, int, int]]:
    """``digest/scope@ratio:R:lag`` items -> (digest, scope, ratio, R, lag)."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        head, R, lag = item.split(":")
        sel, ratio = head.split("@")
        digest, scope = sel.split("/")
        if (digest not in DIGESTS or scope not in SCOPES or not re.fullmatch(r"\d+|e[1-9]\d*", lag)
                or (prefilter_page(digest) and scope != "layer")):
            raise SystemExit(f"bad forward setting {item!r}: digest/scope@ratio:R:lag, digest in {DIGESTS}, "
                             f"scope in {SCOPES} (two-stage digests: layer), lag a step count (0: the "
                             f"query's own) or eK (a selection refreshed every K steps)")
        out.append((digest, scope, float(ratio), int(R), lag))
    return out


def outcome(lg_rows: torch.Tensor, enc: "sp.Encoded", positions: torch.Tensor, hard: set, target: str) -> dict:
    """Digits and reads right from the logits at ``positions - 1`` (one row per digit)."""
    right = lg_rows.argmax(-1) == enc.ids[positions]
    by_pos = dict(zip(positions.tolist(), right.tolist()))
    reads = [all(by_pos[p] for p in r) for r in enc.reads]
    target_reads = [ok for ok, acct in zip(reads, enc.accounts) if acct == target]
    return {"right": bool(right.all()), "digits": int(right.numel()), "digits_right": int(right.sum()),
            "reads": len(reads), "reads_right": sum(reads), "hard_reads": len(hard),
            "hard_right": sum(ok for i, ok in enumerate(reads) if i in hard),
            "target_reads": len(target_reads), "target_right": all(target_reads)}


def probe_problem(model, enc: "sp.Encoded", target: str, a, forwards, stats: dict,
                  rank: bool = True) -> Dict[str, dict]:
    """Forward outcomes per setting (and ``full``, ``kara@ratio``); with ``rank``, the ranking
    statistics (recall, lead, churn) are added into ``stats``."""
    logits, cap = sp.capture_qk(model, enc.ids)
    T = enc.ids.shape[0]
    L, Hkv, _, D = cap.k.shape
    shared_layers = a.shared_layers_resolved
    positions = enc.digit_positions
    out = {"full": outcome(logits[positions - 1], enc, positions, set(), target)}
    del logits
    for ratio in a.ratios:
        sched = kara_schedule(cap, T, enc.prompt_len, a.window, a.buffer, ratio, a.chunk_size, a.chunk_fraction)
        hr = hard_reads(enc, sched.evict)
        mass = value_mass(cap, hr, sched.evict) if rank else None
        mine = [f for f in forwards if f[2] == ratio]
        for digest in a.digests:
            dig = Digest(digest, cap, sched, a.bits_group, a.prefilter_tokens)
            for scope in a.scopes:
                if dig.pre_P and scope != "layer":  # a page choice per (layer, KV head) only
                    continue
                key = f"{digest}/{scope}@{ratio:g}"
                st = stats.setdefault(key, new_stats(a.horizon))
                if rank:
                    st["problems"] += 1
                    need = value_need(dig, scope, hr, a.horizon, shared_layers)
                    add_need_stats(st, need, mass, a.horizon)
                    new, samples = churn(dig, scope, T, a.churn_stride, shared_layers)
                    st["churn_new"] = [x + int(y) for x, y in zip(st["churn_new"], new.tolist())]
                    st["churn_samples"] += samples
                runs = [f for f in mine if f[0] == digest and f[1] == scope]
                if not runs:
                    continue
                sel = selections(dig, scope, max(f[3] for f in runs), T, shared_layers)
                batch = [(sel[..., :(f[3] // dig.P) * dig.P], f[4]) for f in runs]
                batch = [(s if s.shape[-1] else None, lag) for s, lag in batch]
                names = [f"{digest}/{scope}@{ratio:g} R{f[3]} {lag_label(f[4])}" for f in runs]
                out.update(run_batches(model, enc, sched, batch, names, hr, target, a.mask_gib))
                del sel
        out.update(run_batches(model, enc, sched, [(None, 0)], [f"kara@{ratio:g}"], hr, target, a.mask_gib))
    return out


def run_batches(model, enc, sched, batch, names, hr, target, mask_gib) -> Dict[str, dict]:
    T = enc.ids.shape[0]
    Hkv = model.config.num_key_value_heads
    per = max(1, int(mask_gib * 2 ** 30 // (Hkv * T * T * 4)))  # bool mask + bf16/fp32 bias
    resident = resident_mask(sched.evict)
    positions = enc.digit_positions
    hard = set(hr.index)
    out = {}
    for b0 in range(0, len(batch), per):
        lg = recall_logits(model, enc.ids, resident, batch[b0:b0 + per], positions - 1)
        for name, rows in zip(names[b0:b0 + per], lg):
            out[name] = outcome(rows, enc, positions, hard, target)
    return out


def new_stats(horizon: int) -> dict:
    n = len(R_GRID)
    return {"problems": 0, "hard_reads": 0, "recall_lag0": [0.0] * n, "recall_lag1": [0.0] * n,
            "lead_hist": [[0] * (horizon + 2) for _ in R_GRID], "churn_new": [0] * n, "churn_samples": 0}


def add_need_stats(st: dict, need: torch.Tensor, mass: torch.Tensor, horizon: int) -> None:
    """need ``[reads, L', H', k]``, mass ``[reads, L, Hkv]``: weighted recall at lag 0 and 1 and
    the lead of the most attended (layer, head) (or of the shared selection)."""
    n = need.shape[0]
    st["hard_reads"] += n
    if n == 0:
        return
    if need.shape[1] * need.shape[2] > 1:  # per (layer, head): weighted by the attention each pays
        w = mass.flatten(1)
        w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
        w = w / w.sum(1, keepdim=True)
        flat = need.flatten(1, 2)  # [reads, L*H, k]
        dom = flat[torch.arange(n, device=need.device), w.argmax(1)]  # [reads, k]
    else:
        w = torch.ones(n, 1, device=need.device)
        flat, dom = need.flatten(1, 2), need[:, 0, 0]
    for gi, R in enumerate(R_GRID):
        st["recall_lag0"][gi] += float((w * (flat[..., 0] <= R)).sum())
        st["recall_lag1"][gi] += float((w * (flat[..., 1] <= R)).sum()) if horizon >= 1 else 0.0
        ok = dom <= R  # [reads, k]
        streak = ok.long().cumprod(1).sum(1) - 1  # -1: not at the read; horizon: held all along
        st["lead_hist"][gi] = [x + int(y) for x, y in zip(st["lead_hist"][gi],
                                                          torch.bincount(streak + 1, minlength=horizon + 2).tolist())]


# --------------------------------------------------------------------------- command


def main(argv: List[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="the ledger reasoner's folder")
    ap.add_argument("--out", help="JSON, written as the run goes")
    ap.add_argument("--report", help="print the tables of an existing result JSON and exit")
    ap.add_argument("--n", type=int, default=500, help="held-out problems per style")
    ap.add_argument("--styles", default="verbose,dense")
    ap.add_argument("--ratios", default="0.25,0.125")
    ap.add_argument("--forwards", default=DEFAULT_FORWARDS,
                    help="masked forwards, digest/scope@ratio:R:lag (plain Kara and full KV always)")
    ap.add_argument("--digests", default=",".join(DIGESTS), help="digests ranked (forwards add theirs)")
    ap.add_argument("--scopes", default=",".join(SCOPES))
    ap.add_argument("--shared-layers", default="", help="layers of the shared selection (default: Kara's vote layers)")
    ap.add_argument("--rank-every", type=int, default=4,
                    help="ranking statistics on every k-th problem (forwards on all): they pool thousands of reads")
    ap.add_argument("--horizon", type=int, default=16, help="steps looked back for the lead time")
    ap.add_argument("--churn-stride", type=int, default=8, help="sample one step pair in this many")
    ap.add_argument("--bits-group", type=int, default=32, help="channels per scale/zero of the low-bit keys")
    ap.add_argument("--prefilter-tokens", type=int, default=1024,
                    help="tokens of the pages a two-stage digest (quest16+bits4) ranks")
    ap.add_argument("--mask-gib", type=float, default=12, help="mask memory per batched forward")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--buffer", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=8)
    ap.add_argument("--chunk-fraction", type=float, default=0.5)
    ap.add_argument("--trace-tokens", type=int, default=0, help="fixed trace length (default: the task's draw)")
    ap.add_argument("--seconds", type=float, default=0, help="stop starting problems after this long (0: no limit)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    if a.report:
        print_report(json.loads(Path(a.report).read_text()))
        return
    if not (a.model and a.out):
        ap.error("--model and --out (or --report)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    a.ratios = [float(x) for x in a.ratios.split(",")]
    forwards = parse_forwards(a.forwards)
    a.digests = [d for d in DIGESTS if d in a.digests.split(",") or any(f[0] == d for f in forwards)]
    a.scopes = [s for s in SCOPES if s in a.scopes.split(",") or any(f[1] == s for f in forwards)]
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa").to(a.device).eval()
    cfg = model.config
    a.shared_layers_resolved = ([int(x) for x in a.shared_layers.split(",")] if a.shared_layers
                                else list(KaraConfig().resolve_vote_layers(cfg.num_hidden_layers)))
    t0, records, stats = time.time(), [], {}
    for i in range(a.n):
        for style in a.styles.split(","):
            if a.seconds and time.time() - t0 > a.seconds:
                break
            problem = ledger.make_problem(style, EVAL_SEED0 + i, a.trace_tokens or None)
            enc = sp.encode(tokenizer, problem, a.device)
            outcomes = probe_problem(model, enc, problem.target, a, forwards, stats.setdefault(style, {}),
                                     rank=i % a.rank_every == 0)
            records.append({"style": style, "seed": EVAL_SEED0 + i, "tokens": int(enc.ids.numel()),
                            "outcomes": outcomes})
        if (i + 1) % 10 == 0 or i + 1 == a.n:
            print(f"[{time.time() - t0:6.0f} s] {i + 1} problems per style", flush=True)
            write(a, model, records, stats, t0)
    print_report(write(a, model, records, stats, t0))


def write(a, model, records: List[dict], stats: dict, t0: float) -> dict:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    result = {"window": a.window, "buffer": a.buffer, "chunk_size": a.chunk_size, "chunk_fraction": a.chunk_fraction,
              "ratios": a.ratios, "r_grid": list(R_GRID), "horizon": a.horizon, "rank_every": a.rank_every, "churn_stride": a.churn_stride,
              "bits_group": a.bits_group, "prefilter_tokens": a.prefilter_tokens, "digests": a.digests, "scopes": a.scopes, "shared_layers": a.shared_layers_resolved, "forwards": a.forwards,
              "layers": cfg.num_hidden_layers, "kv_heads": cfg.num_key_value_heads, "head_dim": head_dim,
              "trace_tokens": a.trace_tokens or None, "model": a.model,
              "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
              "seconds": round(time.time() - t0, 1), "stats": stats, "records": records}
    Path(a.out).write_text(json.dumps(result))
    return result


# --------------------------------------------------------------------------- report


def digest_bytes(digest: str, head_dim: int, group: int) -> float:
    """GPU bytes per evicted token per KV head that the digest keeps (exact: the bf16 key)."""
    if digest == "exact":
        return 2 * head_dim
    if prefilter_page(digest):
        first, second = digest.split("+")
        return digest_bytes(first, head_dim, group) + digest_bytes(second, head_dim, group)
    if digest.startswith("quest"):
        return 2 * head_dim * 2 / page_size(digest)  # bf16 min and max per page
    return int(digest[4:]) * head_dim / 8 + 4 * head_dim / group  # fp16 scale and zero per group


def median_lead(hist: List[int]) -> Optional[float]:
    """Median lead over the reads recalled at the read (lead >= 0); hist[0] counts lead -1."""
    counts = hist[1:]
    total = sum(counts)
    if not total:
        return None
    acc = 0
    for lead, c in enumerate(counts):
        acc += c
        if acc * 2 >= total:
            return lead
    return None


def forward_rows(result: dict) -> List[dict]:
    rows = []
    for style in sorted({r["style"] for r in result["records"]}):
        mine = [r for r in result["records"] if r["style"] == style]
        for setting in mine[0]["outcomes"]:
            outs = [r["outcomes"][setting] for r in mine if setting in r["outcomes"]]
            n = len(outs)
            target = sum(o["target_right"] for o in outs)
            lo, hi = wilson_interval(target, n)
            reads, hard = sum(o["reads"] for o in outs), sum(o["hard_reads"] for o in outs)
            rows.append({"style": style, "setting": setting, "n": n, "target_chain_right": target / n,
                         "ci_low": lo, "ci_high": hi, "all_digits_right": sum(o["right"] for o in outs) / n,
                         "reads": reads, "reads_right": sum(o["reads_right"] for o in outs) / max(1, reads),
                         "evicted_reads": hard,
                         "evicted_reads_right": sum(o["hard_right"] for o in outs) / hard if hard else None})
    return rows


def rank_rows(result: dict) -> List[dict]:
    rows = []
    per_token = 2 * 2 * result["head_dim"]  # K and V, bf16, per layer and KV head
    LH = result["layers"] * result["kv_heads"]
    for style, by_key in sorted(result["stats"].items()):
        for key, st in by_key.items():
            digest = key.split("/")[0]
            for gi, R in enumerate(result["r_grid"]):
                if R < page_size(digest):
                    continue
                n = st["hard_reads"]
                fetched = st["churn_new"][gi] / st["churn_samples"] if st["churn_samples"] else None
                rows.append({"style": style, "selector": key, "R": R, "problems": st.get("problems"), "evicted_reads": n,
                             "recall_lag0": st["recall_lag0"][gi] / n if n else None,
                             "recall_lag1": st["recall_lag1"][gi] / n if n else None,
                             "median_lead": median_lead(st["lead_hist"][gi]),
                             "lead_ge1": sum(st["lead_hist"][gi][2:]) / n if n else None,
                             "fetched_tokens_per_step_per_layer_head": fetched,
                             "fetched_kib_per_step": fetched * LH * per_token / 1024 if fetched is not None else None,
                             "digest_share_of_evicted_kv": digest_bytes(digest, result["head_dim"],
                                                                        result["bits_group"]) / per_token})
    return rows


def print_report(result: dict) -> dict:
    pct = lambda x: "    -" if x is None else f"{100 * x:5.1f}"  # noqa: E731
    print(f"recall digests, {result['device']}: W {result['window']} U {result['buffer']} "
          f"γ {result['chunk_size']}, lead horizon {result['horizon']} steps, {result['seconds']} s")
    print(f"\nranking, one problem in {result.get('rank_every', 1)} (reads whose value is evicted; recall = share of the lookup's attention whose keys are "
          "selected; lead = median steps in the top R before the read, among recalled reads):")
    print(f"{'style':8} {'selector':30} {'R':>4} {'reads':>6} {'recall lag0':>11} {'lag1':>6} {'lead':>5} "
          f"{'lead>=1':>7} {'new tok/step/l,h':>16} {'KiB/step':>9} {'digest/KV':>9}")
    for r in rank_rows(result):
        lead = "-" if r["median_lead"] is None else str(r["median_lead"])
        fetched = r["fetched_tokens_per_step_per_layer_head"]
        print(f"{r['style']:8} {r['selector']:30} {r['R']:4d} {r['evicted_reads']:6d} {pct(r['recall_lag0']):>10}% "
              f"{pct(r['recall_lag1']):>5}% {lead:>5} {pct(r['lead_ge1']):>6}% "
              f"{'-' if fetched is None else f'{fetched:.2f}':>16} "
              f"{'-' if fetched is None else format(r['fetched_kib_per_step'], '.1f'):>9} "
              f"{pct(r['digest_share_of_evicted_kv']):>8}%")
    print("\nmasked forwards (problems right: every read of the queried account right, Wilson 95%):")
    print(f"{'style':8} {'setting':34} {'n':>4} {'problems right':>14} {'95% CI':>13} {'reads right':>11} "
          f"{'evicted reads right':>19} {'all digits':>10}")
    for r in forward_rows(result):
        print(f"{r['style']:8} {r['setting']:34} {r['n']:4d} {pct(r['target_chain_right']):>13}% "
              f"{100 * r['ci_low']:5.1f}-{100 * r['ci_high']:5.1f}% {pct(r['reads_right']):>10}% "
              f"{pct(r['evicted_reads_right']):>18}% {pct(r['all_digits_right']):>9}%")
    return result


if __name__ == "__main__":
    main()
