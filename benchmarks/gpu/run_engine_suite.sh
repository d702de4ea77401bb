#!/usr/bin/env bash
# The engine invariant suite on a GPU host with two GPUs, on SGLang's default Hopper backend
# (no --attention-backend: fa3) with overlap scheduling on: bf16 KV on GPU 0 and FP8 (fp8_e4m3)
# KV on GPU 1, side by side; plus the FP8 scorer against float64 on the GPU. Logs go to $OUT
# (default out/run_engine_suite). Needs `pip install -e ".[sglang,test]"` (or the offline path,
# docs/offline.md, with the test wheels in .whl/test/).
#   bash benchmarks/gpu/run_engine_suite.sh             # BACKEND=triton where fa3 is not installed
set -uo pipefail
source benchmarks/gpu/env.sh
BACKEND=${BACKEND:-default}
if [ "$KARA_OFFLINE" = 1 ]; then
  [ "$BACKEND" != default ] || [ -f /tmp/site/.fa3-done ] || { echo "fa3 not installed (docs/offline.md)"; exit 1; }
  [ -d .whl/test ] && python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/test/*.whl 2>&1 | grep -v "already exists"
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/tests
export KARA_TEST_DEVICE=cuda KARA_TEST_ATTENTION_BACKEND=$BACKEND KARA_TEST_OVERLAP=1 KARA_TEST_HEAD_DIM=64
suite() {  # GPU, KV dtype, log name, pytest args...
  local gpu=$1 dtype=$2 name=$3; shift 3
  local t0=$(date +%s)
  CUDA_VISIBLE_DEVICES=$gpu KARA_TEST_KV_DTYPE=$dtype timeout ${SUITE_TIMEOUT:-1200} \
    python3 -m pytest -q -p no:cacheprovider "$@" > $OUT/$name.txt 2>&1
  echo "$name rc=$? in $(( $(date +%s) - t0 )) s: $(tail -1 $OUT/$name.txt)"
}
suite 0 auto suite-$BACKEND-overlap-bf16 tests/test_sglang_engine.py &
( suite 1 fp8_e4m3 suite-$BACKEND-overlap-fp8 tests/test_sglang_engine.py
  CUDA_VISIBLE_DEVICES=1 timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_kv.py -k "not vanilla_fp8 and not refused" \
    > $OUT/fp8-scorer-gpu.txt 2>&1; echo "fp8 scorer rc=$?: $(tail -1 $OUT/fp8-scorer-gpu.txt)" ) &
wait
grep -h -E "^(FAILED|ERROR)|Error" $OUT/suite-*.txt | head -20
