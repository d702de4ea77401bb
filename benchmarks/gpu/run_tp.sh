#!/usr/bin/env bash
# On a host with two GPUs, after `pip install -e ".[sglang,test]"` (or the offline path,
# docs/offline.md, with the test wheels in .whl/test/):
#   0. LongFlow's kernel against SGLang's own decode attention in bf16 (the cases the CPU
#      interpreter cannot run),
#   1. the engine invariant suite at tp_size=2, dp_size=2 and DP attention (tp 2, dp 2) on the
#      GPUs (NCCL, CUDA graphs),
#   2. the NCCL cost of the per-step score all-reduce,
#   3. TP=2 throughput, vanilla and Kara 25% on one server (per-request policies), the KV
#      pool pinned to the one-GPU H100 runs' 423,494 tokens so the rows compare with them.
# Everything goes to $OUT (default out/run_tp). NVLink multicast stays off (NCCL_NVLS_ENABLE=0).
#   bash benchmarks/gpu/run_tp.sh
set -uo pipefail
source benchmarks/gpu/env.sh
if [ "$KARA_OFFLINE" = 1 ] && [ -d .whl/test ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/test/*.whl 2>&1 | grep -v "already exists"
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/tests NCCL_NVLS_ENABLE=0
nvidia-smi -L > $OUT/gpus.txt

echo "=== 0. LongFlow kernel vs SGLang decode attention (GPU, bf16 included)"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_longflow.py -k "not real_sglang" > $OUT/longflow_gpu.txt 2>&1
echo "rc=$?"; tail -2 $OUT/longflow_gpu.txt

echo "=== 1. invariant suite, tp_size=2, dp_size=2, DP attention"
KARA_TEST_DEVICE=cuda timeout ${SUITE_TIMEOUT:-1200} python3 -m pytest -q -p no:cacheprovider tests/test_sglang_parallel.py \
  > $OUT/invariants.txt 2>&1
echo "rc=$?"; tail -3 $OUT/invariants.txt

echo "=== 2. score all-reduce cost (NCCL)"
timeout 60 python3 benchmarks/gpu/bench_tp_allreduce.py --gpus 2 --out $OUT/tp_allreduce.json > $OUT/tp_allreduce.txt 2>&1
echo "rc=$?"; tail -6 $OUT/tp_allreduce.txt

echo "=== 3. throughput at tp_size=2"
WORKLOADS=${WORKLOADS:-"--workload 128x1024+4096~none --workload 128x1024+4096~kara,keep=0.25"}
OUT=$OUT bash benchmarks/gpu/run_serving.sh "tp2:${CONFIG_TIMEOUT:-900}:--policy kara --keep-ratio 0.25 --tp-size 2 \
--max-total-tokens 423494 --disable-prefill-cuda-graph $WORKLOADS"
