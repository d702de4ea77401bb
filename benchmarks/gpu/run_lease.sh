#!/usr/bin/env bash
# Serving runs on a leased GPU machine without a package index, one device call per phase
# (each call carries at most 64 MiB and may last at most 10 minutes; /tmp lives while the
# machine stays warm, so issue the calls back to back):
#   bash benchmarks/gpu/run_lease.sh part         # carry one of .whl/parts/part-a? or .whl/fa3/* per call
#   bash benchmarks/gpu/run_lease.sh bench [SCRIPT.py] ARGS   # a benchmarks/reasoning script
#       # (default recall_step_bench.py) with ARGS, torch + Triton only; carry .whl/kara
#   WAIT=540 bash benchmarks/gpu/run_lease.sh serve "NAME:SECONDS:BENCH_SERVING_ARGS" ...
#       # carry .whl/kara and .whl/extra; installs what the parts hold, starts run_serving.sh in
#       # the background and waits up to WAIT seconds for it
#   WAIT=540 bash benchmarks/gpu/run_lease.sh wait   # waits again; both copy rows and logs to $OUT
#   bash benchmarks/gpu/run_lease.sh test "PYTEST_ARGS" ...   # test suites on the GPU
#       # (KARA_TEST_DEVICE=cuda, SGLang's default backend): one pytest process per argument
#       # string, side by side on the one GPU; carry .whl/kara and .whl/test
# On a host with pip and an index, run run_serving.sh or headline.sh directly instead.
# Keep the lease warm: a machine idle 30 s goes back, so issue the parts, serve and wait calls
# back to back (in one batch of tool calls where the tool allows it). Size the configurations'
# SECONDS so the whole run ends inside the serve call and one wait (about 1,150 s with WAIT=570):
# a third call, issued after reading the second reply, has twice found the machine gone.
set -uo pipefail
PHASE=${1:?usage: run_lease.sh part|bench|serve|wait}
shift
RUN=/tmp/lease
mkdir -p $RUN /tmp/wheels /tmp/fa3
ts() { echo "[$(date +%H:%M:%S)] $*"; }
# A fresh machine compiles every Triton kernel once (about 110 s of a first server's start-up
# with the recall tier): the compiled kernels come back as $OUT/triton-cache.tgz; kept here as
# .whl/triton-cache/triton-cache.tgz and carried, a later lease starts from them (sm_90: the
# same cache serves the H100 and the H200).
export TRITON_CACHE_DIR=/tmp/triton-cache
if [ ! -d $TRITON_CACHE_DIR ] && [ -f .whl/triton-cache/triton-cache.tgz ]; then
  mkdir -p $TRITON_CACHE_DIR && tar xzf .whl/triton-cache/triton-cache.tgz -C $TRITON_CACHE_DIR
fi
pack() {
  [ -n "${OUT:-}" ] || return 0
  cp $RUN/out/row-*.json $RUN/out/log-*.txt $RUN/serving.txt "$OUT"/ 2>/dev/null
  [ -d $TRITON_CACHE_DIR ] && tar czf "$OUT"/triton-cache.tgz -C $TRITON_CACHE_DIR . 2>/dev/null
  [ "$(stat -c %s "$OUT"/triton-cache.tgz 2>/dev/null || echo 0)" -gt 16000000 ] && rm -f "$OUT"/triton-cache.tgz
  ls "$OUT"
}
case $PHASE in
part)
  # WHEEL_PARTS / FA3_PARTS: where this call's carried parts are. With a tracked tree near
  # 18 MiB the 46 MiB parts no longer fit one call: re-split them smaller (the joins only
  # concatenate), e.g. cat .whl/parts/part-* | split -b 32m - .whl/s32/w/part-, and the
  # same for fa3 into .whl/small/f with a MANIFEST naming the new count.
  for f in ${WHEEL_PARTS:-.whl/parts}/part-*; do [ -f "$f" ] && cp "$f" /tmp/wheels/ && ts "stored $f"; done
  for f in ${FA3_PARTS:-.whl/fa3}/*; do [ -f "$f" ] && cp "$f" /tmp/fa3/ && ts "stored $f"; done
  ls /tmp/wheels /tmp/fa3 ;;
bench)
  # KARA_WHEEL: another build's wheel folder (e.g. .whl/kara-prev) for an A/B on one machine.
  WHEEL=${KARA_WHEEL:-.whl/kara}
  TARGET=/tmp/$(basename $WHEEL)
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $TARGET $WHEEL/*.whl 2>&1 | grep -v "already exists"
  SCRIPT=recall_step_bench.py
  case ${1:-} in *.py) SCRIPT=$1; shift ;; esac
  PYTHONPATH=$TARGET python3 benchmarks/reasoning/$SCRIPT "$@" 2>&1 | tee ${OUT:-/tmp}/${SCRIPT%.py}-$(basename $WHEEL).txt ;;
serve)
  # env.sh joins the parts (offline_install.sh) and installs .whl/kara; SGLang's HTTP server
  # also imports soundfile (+ cffi, pycparser), carried in .whl/extra.
  OUT=$RUN/out source benchmarks/gpu/env.sh || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site $(ls .whl/extra/*.whl 2>/dev/null) 2>&1 | grep -v "already exists"
  ts "starting: $*"
  OUT=$RUN/out PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH nohup setsid bash benchmarks/gpu/run_serving.sh "$@" \
    > $RUN/serving.txt 2>&1 < /dev/null &
  echo $! > $RUN/pid
  PHASE=wait ;&
wait)
  end=$(( $(date +%s) + ${WAIT:-540} ))
  while kill -0 "$(cat $RUN/pid)" 2>/dev/null && [ "$(date +%s)" -lt $end ]; do sleep 5; done
  kill -0 "$(cat $RUN/pid)" 2>/dev/null && ts "still running" || ts "finished"
  tail -5 $RUN/serving.txt; grep -hE "Decode batch" $RUN/out/log-*.txt 2>/dev/null | tail -2 | cut -c1-250
  pack ;;
test)
  # Side by side: a GPU step of the tiny test model is mostly the scheduler's CPU work (and the
  # strict checks'), so one process leaves the GPU idle; starts are staggered so that engines
  # do not race for the same free ports.
  source benchmarks/gpu/env.sh || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/test/*.whl 2>&1 | grep -v "already exists"
  export PYTHONPATH=$PYTHONPATH:$PWD/tests KARA_TEST_DEVICE=cuda KARA_TEST_ATTENTION_BACKEND=${BACKEND:-default}
  export KARA_TEST_HEAD_DIM=64  # FlashAttention-3 has no head dim 32
  i=0
  for args in "$@"; do
    i=$((i + 1))
    ( t0=$(date +%s); timeout ${TEST_TIMEOUT:-540} python3 -m pytest -q -p no:cacheprovider -rA $args > $OUT/pytest-$i.txt 2>&1
      ts "pytest $i ($args): rc=$? in $(( $(date +%s) - t0 )) s: $(tail -1 $OUT/pytest-$i.txt)" ) &
    sleep ${TEST_STAGGER:-20}
  done
  wait
  nvidia-smi -L > $OUT/gpus.txt
  grep -h -E "^(PASSED|FAILED|ERROR)" $OUT/pytest-*.txt ;;
*) echo "unknown phase $PHASE"; exit 2 ;;
esac
