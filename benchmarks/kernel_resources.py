"""Registers, spills and shared memory of the recall tier's kernels compiled for a GPU, without one.

    TRITON_INTERPRET=0 python benchmarks/kernel_resources.py [--arch 90]

Triton compiles ahead of time for a named target (no device needed) and its bundled ptxas
reports each kernel's registers per thread, spills and shared memory; from those, how many
programs fit one SM (Hopper: 65,536 registers, 228 KB shared memory, 64 warps). A kernel that
fits few programs per SM has few loads in flight: the first thing to check when a
memory-bound kernel runs far below the bandwidth, and a check that the GPU will compile it at
all (the CPU interpreter accepts code the compiler refuses). One line per setting.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kara_kernels.recall_buffer import _plan_refresh_kernel, _write_planned_kernel
from kara_kernels.recall_pages import _rank_pages_kernel
from kara_kernels.recall_tier import _rank_tier_kernel
from kara_kernels.select_top import _select_top_kernel

SM_REGS, SM_SHARED, SM_WARPS = 65536, 228 * 1024, 64

RANK_SIG = {"Q": "*bf16", "stride_qb": "i32", "stride_qh": "i32", "KC": "*u8", "stride_kcs": "i32",
            "stride_kch": "i32", "KLO": "*fp16", "KST": "*fp16", "stride_kss": "i32", "stride_ksh": "i32",
            "TT": "*i64", "stride_tt": "i32", "ROWS": "*i64", "T_LENS": "*i64", "OUT": "*fp32", "stride_ob": "i32",
            "stride_oh": "i32", "PAGES": "*i64", "stride_pb": "i32", "stride_ph": "i32", "SEL": "*i64",
            "stride_sb": "i32", "stride_sh": "i32", "n_top": "i32", "n_cols": "i32", "scale": "fp32"}
PAGES_SIG = {"Q": "*bf16", "stride_qb": "i32", "stride_qh": "i32", "HI": "*fp16", "LO": "*fp16", "stride_bp": "i32",
             "stride_bh": "i32", "PT": "*i64", "stride_pt": "i32", "ROWS": "*i64", "T_LENS": "*i64", "OUT": "*fp32",
             "stride_ob": "i32", "stride_oh": "i32", "SEL": "*i64", "stride_sb": "i32", "stride_sh": "i32",
             "n_top": "i32", "n_pages": "i32", "scale": "fp32"}
PLAN_SIG = {name: "i32" for name in (
    "stride_selb", "stride_selh", "n_sel", "stride_hr", "stride_hh", "R", "stride_mb", "stride_mh", "stride_mk",
    "stride_pb", "stride_ph", "stride_pk", "stride_tt", "stride_buf")}
PLAN_SIG.update(SEL="*i64", HELD="*i32", MARKS="*i32", PLAN="*i64", N_NEW="*i32", ROWS="*i64", T_LENS="*i64",
                LIVE="*i32", TT="*i64", BUF="*i64", COUNTS="*i64")
WRITE_SIG = {name: "i32" for name in (
    "stride_pb", "stride_ph", "stride_pk", "stride_kcs", "stride_kch", "stride_kss", "stride_ksh", "stride_vcs",
    "stride_vch", "stride_vss", "stride_vsh", "stride_kos", "stride_koh", "stride_vos", "stride_voh", "R")}
WRITE_SIG.update(PLAN="*i64", N_NEW="*i32", KC="*u8", KLO="*fp16",
                 KST="*fp16", VC="*u8", VLO="*fp16", VST="*fp16", KOUT="*bf16", VOUT="*bf16")
SELECT_SIG = {"RANK": "*fp32", "stride_rb": "i32", "stride_rh": "i32", "LENS": "*i64", "OUT": "*i64",
              "stride_ob": "i32", "stride_oh": "i32", "n_cols": "i32", "R": "i32"}


def _ptxas() -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def resources(fn, signature: dict, constexprs: dict, num_warps: int, arch: int) -> str:
    sig = dict(signature, **{name: "constexpr" for name in constexprs})
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                            target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    shared = kernel.metadata.shared
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
        ptx.write(kernel.asm["ptx"])
        ptx.flush()
        report = subprocess.run([_ptxas(), f"-arch=sm_{arch}a", "-v", ptx.name, "-o", os.devnull],
                                capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    per_sm = min(SM_REGS // (regs * 32 * num_warps), SM_SHARED // max(shared, 1), SM_WARPS // num_warps)
    return f"{regs} regs, {spills} B spilled, {shared // 1024} KB shared: {per_sm} programs ({per_sm * num_warps} warps) per SM"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90)
    a = ap.parse_args()
    # The headline's shape: Llama-8B (4 query heads per KV head, head dim 128), 4-bit tier.
    for block_e, warps, stages in ((64, 4, 1), (64, 4, 2), (64, 4, 3), (128, 4, 1)):
        common = dict(GROUP=4, HEAD_DIM=128, BLOCK_E=block_e, SPLIT=2, STAGES=stages, BITS=4, QGROUP=32, IEEE=False)
        for name, low, bias in (("TF32", False, False), ("bf16", True, False), ("bf16, biased codes", True, True)):
            c = dict(common, G_PAD=4, BLOCK_BYTES=64, LOW_DOT=low, HEAD_MAJOR=False, BIAS_CODES=bias, PAGE=0,
                     TOP=False, BLOCK_SEL=16, SORTED_TOP=False, K_TOP=16)
            print(f"rank_tier block-diagonal, {name} block_e={block_e} warps={warps} stages={stages}: "
                  f"{resources(_rank_tier_kernel, RANK_SIG, c, warps, a.arch)}", flush=True)
    # The two-stage ranking: the pages' bound, then the chosen pages' tokens (16-token pages);
    # "selecting": the selection in the ranking kernel (scores of up to 2,048 pages of a
    # 17.5k-token row, then 64 pages' 1,024 tokens), by radix passes or sorted in registers.
    for block_p, warps, top, srt in ((32, 4, False, False), (64, 8, False, False), (32, 4, True, False),
                                     (32, 4, True, True)):
        c = dict(GROUP=4, G_PAD=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_P=block_p, PAGE=16, DOT16=True, TOP=top,
                 BLOCK_SEL=2048 if top else 16, SORTED_TOP=srt, K_TOP=64 if srt else 16)
        print(f"rank_pages{', selecting' if top else ''}{' (sorted)' if srt else ''} block_p={block_p} warps={warps}: "
              f"{resources(_rank_pages_kernel, PAGES_SIG, c, warps, a.arch)}", flush=True)
    for split, top, srt in ((2, False, False), (1, True, False), (1, True, True)):
        c = dict(GROUP=4, HEAD_DIM=128, BLOCK_E=64, SPLIT=split, STAGES=3, BITS=4, QGROUP=32, IEEE=False, G_PAD=4,
                 BLOCK_BYTES=64, LOW_DOT=True, HEAD_MAJOR=False, BIAS_CODES=True, PAGE=16, TOP=top,
                 BLOCK_SEL=1024 if top else 16, SORTED_TOP=srt, K_TOP=256 if srt else 16)
        print(f"rank_tier over chosen pages{', selecting' if top else ''}{' (sorted)' if srt else ''}, bf16, biased "
              f"codes, block_e=64 warps=4 stages=3: {resources(_rank_tier_kernel, RANK_SIG, c, 4, a.arch)}", flush=True)
    print(f"refresh_recall_buffer plan block=256 warps=4, counting: "
          f"{resources(_plan_refresh_kernel, PLAN_SIG, dict(BLOCK=256, COUNT=True), 4, a.arch)}", flush=True)
    c = dict(HEAD_DIM=128, BLOCK_D=128, V_DIM=128, BLOCK_DV=128, BLOCK_W=16, BITS=4, QGROUP=32)
    print(f"refresh_recall_buffer writes block_w=16 warps=8: "
          f"{resources(_write_planned_kernel, WRITE_SIG, c, 8, a.arch)}", flush=True)
    for block, warps in ((512, 4), (1024, 8), (2048, 4), (2048, 8)):
        print(f"select_top block={block} warps={warps}: "
              f"{resources(_select_top_kernel, SELECT_SIG, dict(BLOCK=block, BLOCK_R=256, SORTED=False), warps, a.arch)}",
              flush=True)
    for block, top in ((2048, 64), (1024, 256)):  # the two stages' rows, sorted in registers
        print(f"select_top sorted block={block} top={top} warps=4: "
              f"{resources(_select_top_kernel, SELECT_SIG, dict(BLOCK=block, BLOCK_R=top, SORTED=True), 4, a.arch)}",
              flush=True)


if __name__ == "__main__":
    main()
