#!/usr/bin/env bash
# On a 2-GPU machine (device kind nvidia-h100-x2), with the wheels carried as for
# run_serving.sh (.whl/parts -> /tmp/wheels, .whl/kara/*.whl) plus the test wheels in
# .whl/test/ (pytest, pluggy, iniconfig, packaging, hypothesis, attrs, sortedcontainers):
#   0. LongFlow's kernel against SGLang's own decode attention in bf16 (the cases the CPU
#      interpreter cannot run),
#   1. the engine invariant suite at tp_size=2, dp_size=2 and DP attention (tp 2, dp 2) on the
#      GPUs (NCCL, CUDA graphs),
#   2. the NCCL cost of the per-step score all-reduce,
#   3. TP=2 throughput, vanilla and Kara 25% on one server (per-request policies), the KV
#      pool pinned to the one-GPU runs' 423,494 tokens so the rows compare with them.
# Everything goes to $OUT. NCCL_NVLS_ENABLE=0 (the image's setting) is kept.
set -uo pipefail
bash benchmarks/gpu/run_serving.sh; [ -f /tmp/site/.done ] || exit 1   # no configurations: installs the wheels only
SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $SITE .whl/test/*.whl 2>&1 | grep -v "already exists"
export PYTHONPATH=$SITE:$PWD/tests PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
nvidia-smi -L > $OUT/gpus.txt

echo "=== 0. LongFlow kernel vs SGLang decode attention (GPU, bf16 included)"
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_longflow.py -k "not real_sglang" > $OUT/longflow_gpu.txt 2>&1
echo "rc=$?"; tail -2 $OUT/longflow_gpu.txt

echo "=== 1. invariant suite, tp_size=2, dp_size=2, DP attention"
KARA_TEST_DEVICE=cuda timeout ${SUITE_TIMEOUT:-400} python3 -m pytest -q -p no:cacheprovider tests/test_sglang_parallel.py \
  > $OUT/invariants.txt 2>&1
echo "rc=$?"; tail -3 $OUT/invariants.txt

echo "=== 2. score all-reduce cost (NCCL)"
timeout 60 python3 benchmarks/gpu/bench_tp_allreduce.py --gpus 2 --out $OUT/tp_allreduce.json > $OUT/tp_allreduce.txt 2>&1
echo "rc=$?"; tail -6 $OUT/tp_allreduce.txt

echo "=== 3. throughput at tp_size=2"
WORKLOADS=${WORKLOADS:-"--workload 128x1024+4096~none --workload 128x1024+4096~kara,keep=0.25"}
bash benchmarks/gpu/run_serving.sh "tp2:${CONFIG_TIMEOUT:-240}:--policy kara --keep-ratio 0.25 --tp-size 2 \
--max-total-tokens 423494 --disable-prefill-cuda-graph $WORKLOADS"
