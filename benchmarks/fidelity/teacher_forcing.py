"""Teacher forcing through the real SGLang server, with a custom logit processor.

SGLang has no teacher-forcing mode, so a :class:`ForceAndRecord` logit processor provides one.
Each request carries, in ``sampling_params["custom_params"]``:

* ``tf_ref``: the token ids to force, one per output position;
* ``tf_log``: a file the processor appends its records to (it runs in the scheduler process);
* ``tf_tag``: a string naming the request in the records.

For every output position ``pos`` (the number of tokens the request already has, read from
``custom_params["__req__"].output_ids``, which SGLang injects in the scheduler) the processor
reads the *raw* logits row, records ``log_softmax(row)[ref]`` and ``argmax(row)``, and then
masks every other logit so that greedy sampling picks ``ref``. The recording has to happen here
because SGLang applies custom processors *before* it computes returned logprobs: its own
logprobs would see the forced row. Positions past ``len(tf_ref)`` are not forced: the model
runs free (greedy) and the processor records its argmax (``ref`` = ``-1``).

The processor is serialised by ``dill`` by reference (module ``teacher_forcing``), so this
folder must be importable in the scheduler: :func:`importable` puts it on ``sys.path`` and
``PYTHONPATH`` before the engine starts. The engine needs :data:`ENGINE_ARGS`: custom logit
processors on, and overlap scheduling off (under overlap SGLang samples step N+1 before it
appends step N's token to ``output_ids``, so the processor would read the wrong position).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

HERE = str(Path(__file__).resolve().parent)
ENGINE_ARGS = dict(enable_custom_logit_processor=True, disable_overlap_schedule=True)

try:
    from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor
except ImportError:  # only the pure helpers are usable without sglang
    CustomLogitProcessor = object  # type: ignore[misc,assignment]


def importable() -> None:
    """Let spawned scheduler processes import this module (call before the engine starts)."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if HERE not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join(paths + [HERE])


class ForceAndRecord(CustomLogitProcessor):
    """Record the raw log-likelihood of the reference token and the argmax, then force it."""

    def __call__(self, logits, custom_param_list: Optional[List[Dict[str, Any]]] = None):
        if not custom_param_list:
            return logits
        rows = [(i, params) for i, params in enumerate(custom_param_list) if params and "tf_ref" in params]
        if not rows:
            return logits
        if logits.is_cuda:
            values = self._batched(logits, rows)
        else:
            values = [self._one(logits, i, params) for i, params in rows]
        lines: Dict[str, List[str]] = defaultdict(list)
        for (i, params), (pos, ref, top, logp, top_logit, ref_logit) in zip(rows, values):
            req = params["__req__"]
            # KV the request holds while this token's logits were computed (Kara's window
            # state; None without a policy). meta_info's per-token lists are exact per token only
            # when a request streams; in a batch call they are filled in blocks.
            window = getattr(getattr(req, "kara", None), "window", None)
            kv = getattr(window, "kv_len", None)
            lines[params["tf_log"]].append(json.dumps(
                {"tag": params.get("tf_tag", req.rid), "pos": pos, "ref": ref, "argmax": top,
                 "logp": logp, "top_logit": top_logit, "ref_logit": ref_logit, "kv": kv,
                 "len": len(req.origin_input_ids) + pos}))
        for path, recs in lines.items():
            with open(path, "a") as f:
                f.write("\n".join(recs) + "\n")
        return logits

    @staticmethod
    def _one(logits, i, params):
        """One row (the CPU path: the values of the stored CPU runs, bit for bit)."""
        import torch

        pos = len(params["__req__"].output_ids)
        row = logits[i].detach().float().clone()  # the raw row, before any forcing
        lse = torch.logsumexp(row, dim=-1)
        top = int(torch.argmax(row))
        ref_ids = params["tf_ref"]
        if pos < len(ref_ids):
            ref = int(ref_ids[pos])
            logits[i, :] = float("-inf")
            logits[i, ref] = 0.0
            return pos, ref, top, float(row[ref] - lse), float(row[top]), float(row[ref])
        return pos, -1, top, float(row[top] - lse), float(row[top]), float(row[top])  # free-running tail: greedy

    @staticmethod
    def _batched(logits, rows):
        """All rows at once, one device sync per step (the GPU path; same quantities)."""
        import torch

        idx, refs, poss = [], [], []
        for i, params in rows:
            pos = len(params["__req__"].output_ids)
            ref_ids = params["tf_ref"]
            idx.append(i)
            poss.append(pos)
            refs.append(int(ref_ids[pos]) if pos < len(ref_ids) else -1)
        dev = logits.device
        index = torch.tensor(idx, device=dev)
        raw = logits.index_select(0, index).detach().float()  # the raw rows, before any forcing
        lse = torch.logsumexp(raw, dim=-1)
        top = torch.argmax(raw, dim=-1)
        ref_t = torch.tensor(refs, device=dev)
        pick = torch.where(ref_t >= 0, ref_t, top)  # free-running tail: greedy, nothing forced
        logp = raw.gather(1, pick[:, None])[:, 0] - lse
        forced = [k for k, r in enumerate(refs) if r >= 0]
        if forced:
            f_rows = index[forced]
            logits[f_rows] = float("-inf")
            logits[f_rows, ref_t[forced]] = 0.0
        top_logits = raw.gather(1, top[:, None])[:, 0].tolist()
        pick_logits = raw.gather(1, pick[:, None])[:, 0].tolist()
        tops, logps = top.tolist(), logp.tolist()
        return [(p, r, t, lp, tl, pl) for p, r, t, lp, tl, pl in zip(poss, refs, tops, logps, top_logits, pick_logits)]


def read_records(path) -> Dict[str, List[dict]]:
    """The processor's records per tag, one per output position, in order."""
    per_tag: Dict[str, Dict[int, dict]] = defaultdict(dict)
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                per_tag[r["tag"]][r["pos"]] = r  # a retried position keeps its last record
    out = {}
    for tag, by_pos in per_tag.items():
        n = max(by_pos) + 1
        missing = [p for p in range(n) if p not in by_pos]
        if missing:
            raise RuntimeError(f"{tag}: no record for positions {missing[:5]}...")
        out[tag] = [by_pos[p] for p in range(n)]
    return out


def teacher_forced(engine, requests: Sequence[dict], log_dir: Optional[str] = None):
    """Run ``requests`` teacher-forced in one batch and return (outputs, records per request).

    Each request: ``input_ids`` (the prompt), ``forced`` (output ids to force), optional
    ``free`` (greedy tokens after the forced ones, default 0) and ``params`` (more
    ``custom_params``, e.g. per-request Kara overrides).
    """
    log_dir = log_dir or tempfile.mkdtemp(prefix="tf-")
    path = os.path.join(log_dir, f"{uuid.uuid4().hex}.jsonl")
    Path(path).touch()
    processor = ForceAndRecord.to_str()
    tags = [f"r{i}" for i in range(len(requests))]
    sampling = []
    for tag, r in zip(tags, requests):
        params = dict(r.get("params", {}), tf_ref=[int(t) for t in r["forced"]], tf_log=path, tf_tag=tag)
        sampling.append({"temperature": 0, "ignore_eos": True,
                         "max_new_tokens": len(r["forced"]) + r.get("free", 0), "custom_params": params})
    outs = engine.generate(input_ids=[list(r["input_ids"]) for r in requests], sampling_params=sampling,
                           custom_logit_processor=[processor] * len(requests))
    records = read_records(path)
    os.unlink(path)
    per_request = []
    for tag, r, o in zip(tags, requests, outs):
        recs = records[tag]
        n_forced = len(r["forced"])
        # The mechanism's own check: the server emitted exactly the forced tokens.
        if list(o["output_ids"][:n_forced]) != [int(t) for t in r["forced"]]:
            raise RuntimeError(f"{tag}: the server did not emit the forced tokens")
        per_request.append(recs)
    return outs, per_request


def kv_decode_held(meta: dict) -> Optional[List[int]]:
    """Decode tokens whose KV the request holds, per output position (None: no policy ran)."""
    kept = meta.get("kv_tokens_kept")
    if not kept:
        return None
    if not isinstance(kept, list):
        kept = [kept]
    return [k - meta["prompt_tokens"] for k in kept]
