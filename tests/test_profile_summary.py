"""benchmarks/profile_summary.py on a synthetic trace laid out as torch's profiler writes one:
kernel kinds, per-step division by CUDA-graph launches, and the GPU's idle share."""

import gzip
import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from profile_summary import kind_of, summarize  # noqa: E402

KERNELS = {  # name -> kind it must be counted as
    "void flash::flash_fwd_splitkv_kernel<...>": "attention",
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "gemm",
    "nvjet_tst_128x64_64x8_2x1_v_bz_TNN": "gemm",
    "_window_score_kernel": "kara",
    "_compact_kernel": "kara",
    "void flashinfer::norm::FusedAddRMSNormKernel<8u, __nv_bfloat16>": "norm_rope_act",
    "void at::native::vectorized_elementwise_kernel<4, ...>": "other",
}


@pytest.mark.parametrize("name,kind", KERNELS.items())
def test_kernel_kinds(name, kind):
    assert kind_of(name) == kind


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_step_times_and_idle_share(tmp_path, seed):
    rng = random.Random(seed)
    steps, gap = rng.randint(2, 6), rng.uniform(100.0, 400.0)
    names = list(KERNELS)
    durs = {n: rng.uniform(5.0, 50.0) for n in names}
    events, t = [], 0.0
    for _ in range(steps):
        events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": t, "dur": 3})
        for n in names:  # back to back inside a step, then the GPU waits `gap` us for the host
            events.append({"ph": "X", "cat": "kernel", "name": n, "ts": t, "dur": durs[n]})
            t += durs[n]
        t += gap
    path = tmp_path / "x.trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = summarize(str(path))
    step_us = sum(durs.values())
    assert s["steps"] == steps, f"seed {seed}"
    assert s["gpu_busy_ms_per_step"] == pytest.approx(step_us / 1e3), f"seed {seed}"
    span = steps * step_us + (steps - 1) * gap
    assert s["gpu_idle_share"] == pytest.approx(1 - steps * step_us / span), f"seed {seed}"
    for kind in set(KERNELS.values()):
        want = sum(d for n, d in durs.items() if KERNELS[n] == kind) / 1e3
        assert s["kernel_ms_per_step"][kind] == pytest.approx(want), f"seed {seed}, {kind}"
