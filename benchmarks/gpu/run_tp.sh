#!/usr/bin/env bash
# On a 2-GPU machine (device kind nvidia-h100-x2), with the wheels carried as for
# run_serving.sh (.whl/parts -> /tmp/wheels, .whl/kara/*.whl) plus pytest's wheels in
# .whl/test/ (pytest, pluggy, iniconfig, packaging: `pip download -d .whl/test pytest==9.2.0`):
#   1. the engine invariant suite at tp_size=2 and dp_size=2 on the GPUs (NCCL, CUDA graphs),
#   2. the NCCL cost of the per-step score all-reduce,
#   3. one TP=2 throughput row per policy (vanilla, kara 0.25), with tp_size in the row.
# Everything goes to $OUT. Nothing here was run on a CPU machine: it is untested until the lead runs it.
set -uo pipefail
bash benchmarks/gpu/run_serving.sh || exit 1   # no configurations: installs the wheels only
SITE=/tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $SITE .whl/test/*.whl 2>&1 | grep -v "already exists"
export PYTHONPATH=$SITE:$PWD/tests PYTHONUNBUFFERED=1
nvidia-smi -L > $OUT/gpus.txt

echo "=== 1. invariant suite, tp_size=2 and dp_size=2"
KARA_TEST_DEVICE=cuda timeout 420 python3 -m pytest -q -p no:cacheprovider -x tests/test_sglang_parallel.py \
  > $OUT/invariants.txt 2>&1
echo "rc=$?"; tail -3 $OUT/invariants.txt

echo "=== 2. score all-reduce cost (NCCL)"
timeout 120 python3 benchmarks/gpu/bench_tp_allreduce.py --gpus 2 --out $OUT/tp_allreduce.json > $OUT/tp_allreduce.txt 2>&1
echo "rc=$?"; cat $OUT/tp_allreduce.txt | tail -6

echo "=== 3. throughput at tp_size=2"
for config in "none" "kara 0.25"; do
  read -r policy ratio <<<"$config"
  name="tp2-${policy}-${ratio:-}"
  extra=""; [ -n "${ratio:-}" ] && extra="--keep-ratio $ratio"
  timeout ${CONFIG_TIMEOUT:-420} python3 benchmarks/bench_serving.py --policy $policy $extra --tp-size 2 \
    ${WORKLOADS:-"--workload 128x1024+8192"} --log-file $OUT/log-$name.txt --out $OUT/row-$name.json \
    > $OUT/log-$name.txt 2>&1
  echo "$name rc=$?"; grep -E '^\{|Error|error:' $OUT/log-$name.txt | tail -3
done
