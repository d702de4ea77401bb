"""Fine-tune SmolLM2-135M-Instruct into a ledger reasoner (benchmarks/reasoning/ledger.py).

One seeded run on one or more GPUs (torchrun: data parallel, one process a GPU):

    torchrun --nproc-per-node 2 benchmarks/reasoning/train.py --model M --out DIR --steps 300

Every step sees the same number of tokens (about ``--tokens-per-step``, summed over the
GPUs) drawn from both styles and the whole length range; problems come from
``ledger.make_problem(style, seed)`` with training seeds (below ``EVAL_SEED0``), so the held-out
evaluation problems are never trained on. Loss is on the completion only (the trace and the
answer), never on the prompt. The output folder is a normal Hugging Face model that SGLang
serves, with the context raised to ``CONTEXT`` tokens (the longest problems need about 15k;
SmolLM2 was pretrained at 8k, these lengths are learned here).

``--steps auto`` times the first steps and picks the count that fits ``--seconds``; the
count used is printed, and passing it back as ``--steps N`` repeats the run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ledger  # noqa: E402

EVAL_SEED0 = 1_000_000  # held-out problems use seeds from here on
CONTEXT = 16384
EOS = "<|im_end|>"


def token_rows(tokenizer, p: "ledger.Problem", eos_id: int, follow_up: bool):
    """A problem's ids and labels (loss on what the model writes only). With ``follow_up`` the
    conversation goes on after the first reply's end-of-turn token with a second question
    (ledger.make_follow_up), joined in token space as a server's session joins turns."""
    prompt = tokenizer(p.prompt).input_ids
    completion = tokenizer(p.completion).input_ids + [eos_id]
    ids, labels = prompt + completion, [-100] * len(prompt) + completion
    if follow_up:
        second = ledger.make_follow_up(p)
        question = tokenizer(second.prompt).input_ids
        answer = tokenizer(second.completion).input_ids + [eos_id]
        ids, labels = ids + question + answer, labels + [-100] * len(question) + answer
    return ids, labels


def batch_for_step(tokenizer, step: int, rank: int, tokens: int, eos_id: int, follow_ups: float = 0.0):
    """This rank's problems for one step: one length band, as many as fit ``tokens``; a
    ``follow_ups`` share of them go on with a second turn."""
    rng = random.Random(f"batch:{step}:{rank}")
    style = ledger.STYLES[(step + rank) % 2]
    seed0 = step * 1000 + rank * 500  # below EVAL_SEED0 for every step main() allows
    ids, labels, used, i = [], [], 0, 0
    # Length bands alternate so every step mixes short and long; the long slice is 1 in 4 steps.
    long_band = step % 4 == 3
    while i < 500:
        trace = rng.randint(7000, 8600) if long_band else rng.randint(1200, 3200)
        p = ledger.make_problem(style, seed0 + i, trace_tokens=trace)
        # No draw at 0: the default run's batches stay exactly as they were before follow-ups.
        follow_up = follow_ups > 0 and rng.random() < follow_ups
        row_ids, row_labels = token_rows(tokenizer, p, eos_id, follow_up)
        n = len(row_ids)
        if n > CONTEXT or (ids and used + n > tokens):
            break
        ids.append(row_ids)
        labels.append(row_labels)
        used += n
        i += 1
    width = max(map(len, ids))
    pad = lambda rows, v: torch.tensor([r + [v] * (width - len(r)) for r in rows])  # noqa: E731
    # Right padding under a causal mask never changes the real tokens' outputs: no mask needed.
    return pad(ids, eos_id), pad(labels, -100), used


class Batches(torch.utils.data.Dataset):
    """Step i's batch of this rank, built in DataLoader workers (the CPU work overlaps the GPU's)."""

    def __init__(self, tokenizer, rank: int, tokens: int, eos_id: int, steps: int, follow_ups: float) -> None:
        self.args, self.steps = (tokenizer, rank, tokens, eos_id, follow_ups), steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, step: int):
        tokenizer, rank, tokens, eos_id, follow_ups = self.args
        return batch_for_step(tokenizer, step, rank, tokens, eos_id, follow_ups)


def loss_on_completion(model, ids, labels):
    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1]
    target = labels[:, 1:]
    keep = target != -100
    logits = model.lm_head(hidden[keep]).float()  # only where there is a label: saves memory
    return F.cross_entropy(logits, target[keep])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="SmolLM2-135M-Instruct folder (prepare_smollm2.py)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", default="auto", help="optimizer steps, or auto (fit --seconds)")
    ap.add_argument("--seconds", type=float, default=420, help="training time for --steps auto")
    ap.add_argument("--tokens-per-step", type=int, default=65536, help="summed over GPUs")
    ap.add_argument("--micro-tokens", type=int, default=32768,
                    help="most tokens one forward pass takes (an H200 ran out of memory at 65,536)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--follow-ups", type=float, default=0.0,
                    help="share of problems that go on with a second question (issue 19's multi-turn variant)")
    a = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    device = torch.device("cuda", rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(a.seed)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    # fp32 master weights, bf16 matmuls (autocast): bf16 weights would round small updates away.
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="sdpa").to(device)
    model.config.max_position_embeddings = CONTEXT
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    # Fewer GPUs than the step needs: each process accumulates the batches of several data-parallel
    # ranks, so one GPU trains on exactly the batches two did (same seeds, same averaged gradient).
    accum = max(1, math.ceil(a.tokens_per_step / (world * a.micro_tokens)))
    ranks = world * accum
    assert ranks <= 2, "batch_for_step's seeds leave room for two ranks a step"
    per_rank = a.tokens_per_step // ranks

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loaders = [iter(torch.utils.data.DataLoader(Batches(tokenizer, r, per_rank, eos_id, 999, a.follow_ups),
                                                batch_size=None, num_workers=6, prefetch_factor=4))
               for r in range(rank * accum, (rank + 1) * accum)]

    def step_once(step: int, total: int) -> float:
        warm = min(30, total // 10)
        scale = (step + 1) / warm if step < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
        for group in opt.param_groups:
            group["lr"] = a.lr * scale
        loss = torch.zeros((), device=device)
        for loader in loaders:
            ids, labels, used = next(loader)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                part = loss_on_completion(model, ids.to(device), labels.to(device)) / accum
            part.backward()
            loss += part.detach()
        if distributed:  # one flat all-reduce of every gradient
            # The logged loss is the mean over every batch of the step, whatever the layout: one
            # GPU accumulating both batches and two GPUs one each log the same quantity (before
            # this, two GPUs logged rank 0's batch only, so their losses did not compare).
            dist.all_reduce(loss, op=dist.ReduceOp.AVG)
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat, op=dist.ReduceOp.AVG)
            for p, g in zip(params, flat.split([p.numel() for p in params])):
                p.grad.copy_(g.view_as(p.grad))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    t0 = time.time()
    total = 999 if a.steps == "auto" else int(a.steps)
    assert total < EVAL_SEED0 // 1000, "training seeds would reach the held-out ones"
    step, log = 0, []
    while step < total:
        loss = step_once(step, total)
        step += 1
        if a.steps == "auto" and step == 8:
            per_step = (time.time() - t0) / 8
            budget = torch.tensor([min(999, int(a.seconds / per_step))], device=device)
            if distributed:
                dist.broadcast(budget, 0)
            total = int(budget.item())
            if rank == 0:
                print(f"steps auto: {per_step:.2f} s/step -> {total} steps for {a.seconds:.0f} s "
                      f"(repeat with --steps {total})", flush=True)
        if rank == 0 and (step % 20 == 0 or step == total):
            log.append({"step": step, "loss": round(loss, 4), "seconds": round(time.time() - t0, 1)})
            print(json.dumps(log[-1]), flush=True)
    if rank == 0:
        out = Path(a.out)
        model.to(torch.bfloat16).save_pretrained(out)
        tokenizer.save_pretrained(out)
        cfg = json.loads((out / "config.json").read_text())
        cfg["eos_token_id"] = eos_id
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
        (out / "training.json").write_text(json.dumps({
            "base": "SmolLM2-135M-Instruct", "steps": total, "tokens_per_step": a.tokens_per_step,
            "gpus": world, "ranks": ranks, "lr": a.lr, "seed": a.seed, "follow_ups": a.follow_ups,
            "loss": "mean over every batch of the step (all ranks)", "seconds": round(time.time() - t0, 1),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "log": log}, indent=1))
        print(f"saved {out} after {total} steps, {time.time() - t0:.0f} s", flush=True)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
