"""Which window tokens should a scorer keep? A teacher-forced probe of Kara's scorer and others.

    python benchmarks/reasoning/score_probe.py --model DIR --n 200 --out probe.json

The server grid (run_grid.py) measures one scorer per server and costs a GPU-quarter-hour; this
asks the cheaper question behind it for many scorers at once, on the model and task of issue 16.
For each held-out ledger problem, one full-KV forward over prompt + reference reasoning records
every layer's post-RoPE queries and keys. Each scorer then picks a keep set for every W-token
window of the reasoning on Kara's schedule (window k is compressed once W + U tokens from its
start exist; the queries that vote are the whole tail, the window's own W and the U after it,
except for ``buffer``), Token2Chunk turns scores into the kept positions,
and one more forward, with an attention mask that hides each dropped token from every query
after its window was compressed, gives the model's predictions on the same reference tokens.
That forward computes every later token's KV from the compressed context, exactly as the server
would on this token sequence; what it does not reproduce is the scorer's own inputs (its
queries and keys come from the full-KV forward). A problem counts right when every digit the
reasoning writes is still predicted (the trace's numbers are what greedy decoding must get
right to reach the answer), and a read (a balance written again from memory) counts right when
its digits are.

Scorers (``name@keep``, e.g. ``kara@0.25``):
  kara          the server's scorer: the vote layers and GQA-group mean queries of its defaults,
                softmax of every one of the W + U tail queries over the window keys (no causal
                mask), summed
  kara-all      the same over every layer and query head
  kara-headmax  every layer and head; each head's column sums, then the max over heads
  buffer        only the newest U queries vote (a SnapKV-style observation window), every head
  future        an oracle: the attention the full-KV model later pays to each window token
                (every query after the window's compression, causal softmax over all keys), summed
  future-peak   the same oracle's largest single weight (any later query of any layer and head):
                a token one lookup reads sharply scores high even if nothing else attends to it
  random        uniform random scores (a floor)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# kara_sglang: installed, or PYTHONPATH (not the repo root: its kernels/ shadows a PyPI package transformers probes)
import ledger  # noqa: E402
from train import EOS, EVAL_SEED0  # noqa: E402

from kara_sglang.accuracy.stats import wilson_interval  # noqa: E402
from kara_sglang.config import KaraConfig  # noqa: E402
from kara_sglang.token2chunk import token2chunk  # noqa: E402

SCORERS = ("kara", "kara-all", "kara-headmax", "buffer", "future", "future-peak", "random")


@dataclass
class Captured:
    """Post-RoPE queries ``[L, Hq, T, D]`` and keys ``[L, Hkv, T, D]`` of one sequence."""

    q: torch.Tensor
    k: torch.Tensor


def capture_qk(model, ids: torch.Tensor) -> Tuple[torch.Tensor, Captured]:
    """Full-KV forward: logits ``[T, vocab]`` and every layer's post-RoPE queries and keys.

    Hooks on the q/k projections (stable across transformers releases) plus the model's own
    rotary embedding, rather than patching the attention forward."""
    from transformers.models.llama import modeling_llama

    cfg = model.config
    if hasattr(model.model.layers[0].self_attn, "q_norm"):  # Qwen3: a norm between projection and RoPE
        raise SystemExit("score_probe reads queries at q_proj: Llama/Qwen2-style attention only")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    raw: Dict[Tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for name in ("q_proj", "k_proj"):
            proj = getattr(layer.self_attn, name)
            hooks.append(proj.register_forward_hook(
                lambda _m, _inp, out, key=(i, name): raw.__setitem__(key, out.detach())))
    try:
        with torch.no_grad():
            logits = model(ids[None]).logits[0]
    finally:
        for h in hooks:
            h.remove()
    T = ids.shape[0]
    positions = torch.arange(T, device=ids.device)[None]
    layers = len(model.model.layers)
    q = torch.stack([raw[(i, "q_proj")][0].view(T, -1, head_dim).transpose(0, 1) for i in range(layers)])
    k = torch.stack([raw[(i, "k_proj")][0].view(T, -1, head_dim).transpose(0, 1) for i in range(layers)])
    cos, sin = model.model.rotary_emb(q[0], positions)
    q, k = modeling_llama.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
    return logits, Captured(q, k)


def windows(prompt_len: int, total: int, window: int, buffer: int) -> List[Tuple[int, int]]:
    """``(start, due)`` of every window Kara compresses: keys ``[start, start + W)``, voted on
    by the tail ``[start, due)``; queries at ``due`` and later see only the kept part."""
    out, start = [], prompt_len
    while start + window + buffer <= total:
        out.append((start, start + window + buffer))
        start += window
    return out


def in_window_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Softmax of each query over the window keys, no causal mask: ``q [L, Hq, nq, D]``,
    ``k [L, Hkv, W, D]`` -> ``[L, Hq, nq, W]`` (GQA: query head h reads key head h // R)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    logits = torch.einsum("lhqd,lhkd->lhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    return logits.softmax(dim=-1)


def score_windows(name: str, cap: Captured, wins: Sequence[Tuple[int, int]], window: int,
                  buffer: int, vote_layers: Sequence[int], seed: int) -> torch.Tensor:
    """``[n_windows, W]`` importance of each window token under scorer ``name``."""
    if name in ("future", "future-peak"):
        return future_attention(cap, wins, window, peak=name == "future-peak")
    if name == "random":
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(len(wins), window, generator=gen).to(cap.q.device)
    rows = []
    for start, due in wins:
        keys = cap.k[:, :, start:start + window]
        queries = cap.q[:, :, start:due]
        if name == "kara":  # the server's defaults: vote layers, one mean query per KV group
            layers = list(vote_layers)
            queries, keys = queries[layers], keys[layers]
            L, Hq, nq, D = queries.shape
            queries = queries.view(L, keys.shape[1], Hq // keys.shape[1], nq, D).mean(dim=2)
        elif name == "buffer":
            queries = queries[:, :, -buffer:]
        probs = in_window_probs(queries, keys)
        if name == "kara-headmax":
            rows.append(probs.sum(dim=2).flatten(0, 1).max(dim=0).values)
        else:
            rows.append(probs.sum(dim=(0, 1, 2)))
    return torch.stack(rows)


def future_attention(cap: Captured, wins: Sequence[Tuple[int, int]], window: int, peak: bool = False,
                     block: int = 1024) -> torch.Tensor:
    """Oracle: causal attention every later query of the full-KV model pays each window token
    from the window's compression on, summed over queries, layers and heads (``peak``: the
    largest single weight instead)."""
    L, Hq, T, D = cap.q.shape
    group = Hq // cap.k.shape[1]
    out = torch.zeros(len(wins), window, device=cap.q.device)
    keys_at = torch.arange(T, device=cap.q.device)
    blocks = [(q0, min(T, q0 + block)) for q0 in range(min(due for _, due in wins), T, block)]
    # Each block's causal mask (True: a key after the query), the same for every layer.
    future = [keys_at[None] > keys_at[q0:q1, None] for q0, q1 in blocks]
    for layer in range(L):
        keys = cap.k[layer].repeat_interleave(group, dim=0).float()
        for (q0, q1), causal in zip(blocks, future):
            logits = torch.einsum("hqd,hkd->hqk", cap.q[layer, :, q0:q1].float(), keys) / math.sqrt(D)
            probs = logits.masked_fill(causal, float("-inf")).softmax(dim=-1)  # [Hq, nq, T]
            mass = probs.max(dim=0).values if peak else probs.sum(dim=0)  # [nq, T]
            for w, (start, due) in enumerate(wins):
                rows = slice(max(0, due - q0), q1 - q0)
                if rows.start >= rows.stop:
                    continue
                cols = mass[rows, start:start + window]
                out[w] = torch.maximum(out[w], cols.max(dim=0).values) if peak else out[w] + cols.sum(dim=0)
    return out


def compressed_mask(T: int, wins: Sequence[Tuple[int, int]], kept: torch.Tensor, window: int,
                    device) -> torch.Tensor:
    """``[T, T]`` bool, True where a query may attend: causal, minus each window's dropped
    tokens for every query from the window's compression on."""
    allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    for w, (start, due) in enumerate(wins):
        dropped = torch.ones(window, dtype=torch.bool, device=device)
        dropped[kept[w]] = False
        cols = torch.arange(start, start + window, device=device)[dropped]
        allowed[due:, cols] = False
    return allowed


def masked_logits(model, ids: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Logits with a custom attention mask (an additive float mask: the form every attention
    implementation takes as given)."""
    dtype = next(model.parameters()).dtype
    bias = torch.zeros(allowed.shape, dtype=dtype, device=ids.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    with torch.no_grad():
        return model(ids[None], attention_mask=bias[None, None]).logits[0]


def digits_right(logits: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per position in ``positions``: does the logit row before it predict its token?"""
    return logits[positions - 1].argmax(dim=-1) == ids[positions]


@dataclass
class Encoded:
    ids: torch.Tensor
    prompt_len: int
    digit_positions: torch.Tensor  # token positions of every digit the reasoning writes
    reads: List[List[int]]  # per read (a balance written from memory): its digit positions
    # per read: the digit positions of every earlier copy of its value, and the account read
    sources: List[List[List[int]]] = field(default_factory=list)
    accounts: List[str] = field(default_factory=list)


def tokenize(tokenizer, problem: "ledger.Problem") -> Tuple[List[int], int, Dict[int, int]]:
    """Prompt + completion + end of turn, tokenized as train.py does (prompt and completion
    apart): ``(ids, prompt length, completion char -> token position)``."""
    prompt = tokenizer(problem.prompt).input_ids
    enc = tokenizer(problem.completion, return_offsets_mapping=True)
    P = len(prompt)
    char_tok = {c: P + j for j, (a, b) in enumerate(enc.offset_mapping) for c in range(a, b)}
    return prompt + enc.input_ids + [tokenizer.convert_tokens_to_ids(EOS)], P, char_tok


def encode(tokenizer, problem: "ledger.Problem", device) -> Encoded:
    """The problem's tokens, with the digit tokens of the completion and of each of its reads."""
    ids, P, char_tok = tokenize(tokenizer, problem)
    token_text: Dict[int, str] = {}
    for c, pos in sorted(char_tok.items()):
        token_text[pos] = token_text.get(pos, "") + problem.completion[c]
    digit_tokens = {pos for pos, text in token_text.items() if text.strip().isdigit()}
    digit_pos = sorted(digit_tokens)
    digit_chars = {c: pos for c, pos in char_tok.items() if pos in digit_tokens}
    reads, sources, accounts = [], [], []
    for char, account, src in problem.all_reads:
        pos = sorted({digit_chars[c] for c in range(char, char + 2) if c in digit_chars})
        if pos:
            reads.append(pos)
            sources.append([sorted({digit_chars[c] for c in range(s, s + 2) if c in digit_chars}) for s in src])
            accounts.append(account)
    return Encoded(torch.tensor(ids, device=device), P, torch.tensor(digit_pos, device=device), reads,
                   sources, accounts)


def probe_problem(model, enc: Encoded, settings: Sequence[Tuple[str, float]], window: int, buffer: int,
                  chunk_size: int, chunk_fraction: float, seed: int) -> Dict[str, dict]:
    """Outcome per setting (and ``full``) on one problem."""
    logits, cap = capture_qk(model, enc.ids)
    T = enc.ids.shape[0]
    wins = windows(enc.prompt_len, T, window, buffer)
    vote_layers = KaraConfig().resolve_vote_layers(cap.q.shape[0])

    def outcome(lg: torch.Tensor, kept_tokens: int) -> dict:
        right = digits_right(lg, enc.ids, enc.digit_positions)
        by_pos = dict(zip(enc.digit_positions.tolist(), right.tolist()))
        reads_right = sum(all(by_pos[p] for p in r) for r in enc.reads)
        return {"right": bool(right.all()), "digits": int(right.numel()), "digits_right": int(right.sum()),
                "reads": len(enc.reads), "reads_right": reads_right, "windows": len(wins),
                "kept": kept_tokens}

    out = {"full": outcome(logits, window * len(wins))}
    scores_cache: Dict[str, torch.Tensor] = {}
    for name, keep in settings:
        if not wins:
            out[f"{name}@{keep:g}"] = out["full"]
            continue
        if name not in scores_cache:
            scores_cache[name] = score_windows(name, cap, wins, window, buffer, vote_layers, seed)
        cfg = KaraConfig(window=window, buffer=buffer, keep_ratio=keep, chunk_size=chunk_size,
                         chunk_fraction=chunk_fraction)
        kept = token2chunk(scores_cache[name], cfg.window_budget, cfg.chunk_size, cfg.num_chunks)
        lg = masked_logits(model, enc.ids, compressed_mask(T, wins, kept, window, enc.ids.device))
        out[f"{name}@{keep:g}"] = outcome(lg, int(kept.numel()))
    return out


def summarize(records: List[dict]) -> List[dict]:
    rows = []
    for style in sorted({r["style"] for r in records}):
        mine = [r for r in records if r["style"] == style]
        for setting in mine[0]["outcomes"]:
            outs = [r["outcomes"][setting] for r in mine]
            n, right = len(outs), sum(o["right"] for o in outs)
            lo, hi = wilson_interval(right, n)
            reads = sum(o["reads"] for o in outs)
            rows.append({"style": style, "setting": setting, "n": n, "all_digits_right": right / n,
                         "ci_low": lo, "ci_high": hi,
                         "digit_accuracy": sum(o["digits_right"] for o in outs) / max(1, sum(o["digits"] for o in outs)),
                         "read_accuracy": sum(o["reads_right"] for o in outs) / max(1, reads), "reads": reads})
    return rows


def print_rows(rows: List[dict]) -> None:
    print(f"{'style':8} {'setting':20} {'n':>4} {'all digits right':>17} {'95% CI':>13} {'reads right':>11} {'digits':>7}")
    for r in rows:
        print(f"{r['style']:8} {r['setting']:20} {r['n']:4d} {100 * r['all_digits_right']:16.1f}% "
              f"{100 * r['ci_low']:5.1f}-{100 * r['ci_high']:5.1f}% {100 * r['read_accuracy']:10.1f}% "
              f"{100 * r['digit_accuracy']:6.2f}%")


def parse_settings(text: str) -> List[Tuple[str, float]]:
    out = []
    for item in text.split(","):
        name, _, keep = item.strip().partition("@")
        if name not in SCORERS:
            raise SystemExit(f"unknown scorer {name!r}; choose from {', '.join(SCORERS)}")
        out.append((name, float(keep or 0.25)))
    return out


def main(argv: List[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True, help="JSON: rows per style and setting, and per-problem records")
    ap.add_argument("--n", type=int, default=200, help="held-out problems per style")
    ap.add_argument("--styles", default="verbose,dense")
    ap.add_argument("--settings", default="kara@0.25,kara@0.5,kara-all@0.25,kara-headmax@0.25,buffer@0.25,"
                                          "future@0.25,future@0.125,future-peak@0.25,random@0.25")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--buffer", type=int, default=64)
    ap.add_argument("--chunk-size", type=int, default=8)
    ap.add_argument("--chunk-fraction", type=float, default=0.5)
    ap.add_argument("--trace-tokens", type=int, default=0, help="fixed trace length (default: the task's draw)")
    ap.add_argument("--seconds", type=float, default=0, help="stop starting problems after this long (0: no limit)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = parse_settings(a.settings)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="sdpa").to(a.device).eval()
    t0, records = time.time(), []
    for i in range(a.n):
        for style in a.styles.split(","):
            if a.seconds and time.time() - t0 > a.seconds:
                break
            problem = ledger.make_problem(style, EVAL_SEED0 + i, a.trace_tokens or None)
            enc = encode(tokenizer, problem, a.device)
            outcomes = probe_problem(model, enc, settings, a.window, a.buffer, a.chunk_size, a.chunk_fraction,
                                     seed=EVAL_SEED0 + i)
            records.append({"style": style, "seed": EVAL_SEED0 + i, "tokens": int(enc.ids.numel()),
                            "outcomes": outcomes})
        if (i + 1) % 20 == 0:  # a run cut short keeps what it finished
            print(f"[{time.time() - t0:6.0f} s] {i + 1} problems per style", flush=True)
            write(a, records, t0)
    print_rows(write(a, records, t0))


def write(a: argparse.Namespace, records: List[dict], t0: float) -> List[dict]:
    rows = summarize(records)
    Path(a.out).write_text(json.dumps({"window": a.window, "buffer": a.buffer, "chunk_size": a.chunk_size,
                                       "trace_tokens": a.trace_tokens or None,
                                       "chunk_fraction": a.chunk_fraction, "model": a.model,
                                       "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
                                       "seconds": round(time.time() - t0, 1), "rows": rows, "records": records}))
    return rows


if __name__ == "__main__":
    main()
