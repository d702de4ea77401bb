#!/usr/bin/env bash
# Issue 31 in one call on ONE GPU: Kara on DeepSeek MLA and gpt-oss hybrid sliding-window models,
# SGLang's defaults (no --attention-backend: fa3 on Hopper; overlap scheduling on).
#   1. tests/test_sglang_mla.py and tests/test_sglang_swa.py on the GPU (KARA_TEST_DEVICE=cuda,
#      KARA_TEST_ATTENTION_BACKEND=default, KARA_TEST_OVERLAP=1, KARA_TEST_HEAD_DIM=64; the MLA
#      model with DeepSeek's latent dims; -m "$SUITE_MARKERS", default "not slow and not
#      newest_release" as CI's 0.5.17 stage) -> $OUT/tests.txt
#   2. a serving smoke of each full-size shape with dummy weights (bench_serving.py
#      --model-shape deepseek-v3-cut / gpt-oss-20b, pools pinned as benchmarks/gpu/arch.sh pins
#      them), Kara with no other flag (--policy kara --keep-ratio 0.25: W 512, U the server's
#      default: 64, and on gpt-oss 128, which covers its sliding window) and --policy none, on $WORKLOAD
#      (default 16x1024+2048: three compressions a Kara request) -> $OUT/log-*.txt, row-*.json
# $OUT/summary.txt says, per part, whether it passed, whether the decode logs show Kara
# compressing, and any error lines.
#   bash benchmarks/gpu/run_arch_suite.sh     # offline: carry .whl/kara, .whl/extra, .whl/test
#
# Order: SGLang sizes a KV pool from the GPU memory free when its process starts (less a share
# of what was free before its weights loaded), so a server loading tens of GB while a test
# engine starts could leave that engine no pool. Hence: both DeepSeek servers start side by side
# (30 GB of weights and a 2.8 GB pool each); once both are up (or gone), the tests start beside
# their workloads; after both, gpt-oss vanilla (42 GB + a 76 GB pool), then gpt-oss Kara. The
# DeepSeek rows are smoke rows (two servers and the tests share the GPU), not throughput.
# Time: TOTAL (default 510 s) bounds the whole call; SUITE_TIMEOUT (300) the tests,
# SMOKE_TIMEOUT (240) each server, START_WAIT (200) the wait for the DeepSeek servers; a part
# reaching the deadline is cut (its log kept) or skipped, and the summary says so.
# CPU_SMOKE=1 runs the same steps on a CPU (tests on the CPU, bench_serving.py --cpu-smoke).
set -uo pipefail
T0=$(date +%s)
CPU_SMOKE=${CPU_SMOKE:-0}
TOTAL=${TOTAL:-$([ "$CPU_SMOKE" = 1 ] && echo 2400 || echo 510)}
SUITE_TIMEOUT=${SUITE_TIMEOUT:-$([ "$CPU_SMOKE" = 1 ] && echo 1500 || echo 300)}
SMOKE_TIMEOUT=${SMOKE_TIMEOUT:-$([ "$CPU_SMOKE" = 1 ] && echo 900 || echo 240)}
START_WAIT=${START_WAIT:-$([ "$CPU_SMOKE" = 1 ] && echo 600 || echo 200)}
SUITE_MARKERS=${SUITE_MARKERS:-not slow and not newest_release}
WORKLOAD=${WORKLOAD:-16x1024+2048}
DEADLINE=$(( T0 + TOTAL - 10 ))  # 10 s kept for the summary
source benchmarks/gpu/env.sh  # python3 that imports sglang and kara_sglang (offline: /tmp/site); OUT
export OUT
ts() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - T0 )) s] $*"; }
bound() {  # WANT: WANT seconds, or what is left before the deadline if less
  local left=$(( DEADLINE - $(date +%s) ))
  echo $(( $1 < left ? $1 : left ))
}
if [ "$KARA_OFFLINE" = 1 ]; then
  [ -f /tmp/site/.fa3-done ] || ts "warning: fa3 not installed in /tmp/site (docs/offline.md); SGLang's default backend on Hopper needs it"
  for d in .whl/test .whl/extra; do
    [ -d $d ] && python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site $d/*.whl 2>&1 | grep -v "already exists"
  done
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/tests
if [ "$CPU_SMOKE" = 1 ]; then
  TEST_ENV=(KARA_TEST_OVERLAP=1)
  SMOKE_ARGS="--cpu-smoke --window 64 --overlap on --workload 4x64+200 --warmup 2x16+40"
  BUFFER=(16 16)
else
  export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
  nvidia-smi > $OUT/gpu.txt 2>&1
  TEST_ENV=(KARA_TEST_DEVICE=cuda KARA_TEST_ATTENTION_BACKEND=default KARA_TEST_OVERLAP=1 KARA_TEST_HEAD_DIM=64)
  SMOKE_ARGS="--attention-backend default --overlap on --disable-prefill-cuda-graph --workload $WORKLOAD"
  BUFFER=("" "")  # no --kara-buffer: the server's default U (gpt-oss: its sliding window + 1)
fi
ts "SGLang $(python3 -c 'import importlib.metadata as m; print(m.version("sglang"))' 2>/dev/null), $OUT"

pool() {  # SHAPE: the pool arch.sh pins (arch_bytes_model.py --counts; 90% of it for gpt-oss), or POOL_<SHAPE>
  local override=POOL_${1//-/_} p
  [ -n "${!override:-}" ] && { echo "${!override}"; return; }
  p=$(python3 benchmarks/arch_bytes_model.py --counts "$1" \
      --device "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" | cut -d' ' -f1) || return 1
  [ "$1" = deepseek-v3-cut ] || p=$(( p * 9 / 10 ))
  echo $p
}
shape_args() {  # SHAPE BUFFER POOL
  echo "--model-shape $1${2:+ --buffer $2} $SMOKE_ARGS${3:+ --max-total-tokens $3}"
}
smoke() {  # NAME SECONDS ARGS: one bench_serving.py process (one server start-up)
  local name=$1 secs=$2 args=$3 t0=$(date +%s)
  if [ "$secs" -lt 30 ]; then
    echo "skipped: $secs s left before the deadline" > $OUT/rc-$name.txt; ts "$name skipped ($secs s left)"; return
  fi
  echo "$args" > $OUT/args-$name.txt
  timeout -k 10 "$secs" python3 benchmarks/bench_serving.py $args \
    --log-file $OUT/log-$name.txt --out $OUT/row-$name.json > $OUT/log-$name.txt 2>&1
  local rc=$?
  echo "rc=$rc after $(( $(date +%s) - t0 )) s (limit $secs s)" > $OUT/rc-$name.txt
  ts "$name rc=$rc after $(( $(date +%s) - t0 )) s"
}
up_or_gone() {  # NAME PID: the server is up (its BENCH-ENV line) or its process ended
  grep -q "^BENCH-ENV" $OUT/log-$1.txt 2>/dev/null || ! kill -0 "$2" 2>/dev/null
}

# Pool counts first (a Python start-up each, side by side; none on a CPU), then both DeepSeek servers.
if [ "$CPU_SMOKE" != 1 ]; then
  pool deepseek-v3-cut > $OUT/pool-deepseek-v3-cut.txt & pool gpt-oss-20b > $OUT/pool-gpt-oss-20b.txt & wait
fi
DS_ARGS=$(shape_args deepseek-v3-cut "${BUFFER[0]}" "$(cat $OUT/pool-deepseek-v3-cut.txt 2>/dev/null)")
GPT_ARGS=$(shape_args gpt-oss-20b "${BUFFER[1]}" "$(cat $OUT/pool-gpt-oss-20b.txt 2>/dev/null)")
ts "deepseek-v3-cut: $DS_ARGS"
ts "gpt-oss-20b: $GPT_ARGS"
s=$(bound $SMOKE_TIMEOUT)
smoke deepseek-v3-cut-kara "$s" "--policy kara --keep-ratio 0.25 $DS_ARGS" & ds_kara=$!
smoke deepseek-v3-cut-vanilla "$s" "--policy none $DS_ARGS" & ds_vanilla=$!
waited=0
until { up_or_gone deepseek-v3-cut-kara $ds_kara && up_or_gone deepseek-v3-cut-vanilla $ds_vanilla; } \
      || [ $waited -ge "$START_WAIT" ]; do sleep 2; waited=$(( waited + 2 )); done
ts "DeepSeek servers up or gone after $waited s: $(grep -h '^BENCH-ENV' $OUT/log-deepseek-v3-cut-*.txt 2>/dev/null | wc -l) of 2 up"

s=$(bound $SUITE_TIMEOUT)
if [ "$s" -ge 30 ]; then
  ts "tests (${TEST_ENV[*]}; -m \"$SUITE_MARKERS\"; limit $s s)"
  t=$(date +%s)
  env -u KARA_TEST_KV_DTYPE "${TEST_ENV[@]}" timeout -k 10 "$s" python3 -m pytest -q -rs -p no:cacheprovider \
    -m "$SUITE_MARKERS" tests/test_sglang_mla.py tests/test_sglang_swa.py > $OUT/tests.txt 2>&1
  echo "rc=$? after $(( $(date +%s) - t )) s (limit $s s)" > $OUT/rc-tests.txt
  ts "tests $(cat $OUT/rc-tests.txt): $(grep -E "passed|failed|error|skipped|no tests ran" $OUT/tests.txt | tail -1)"
else
  echo "skipped: $s s left before the deadline" > $OUT/rc-tests.txt; ts "tests skipped ($s s left)"
fi
wait $ds_kara $ds_vanilla

smoke gpt-oss-20b-vanilla "$(bound $SMOKE_TIMEOUT)" "--policy none $GPT_ARGS"
smoke gpt-oss-20b-kara "$(bound $SMOKE_TIMEOUT)" "--policy kara --keep-ratio 0.25 $GPT_ARGS"

python3 - "$OUT" <<'EOF' | tee $OUT/summary.txt
import glob, json, os, re, sys

out = sys.argv[1]
BENIGN = re.compile(r"server_args=|Ignore import error|SyntaxWarning|DeprecationWarning|Configuration class for")
ERROR = re.compile(r"Traceback|\w*Error\b|CUDA error|out of memory|Exception|Killed|core dumped|Fatal")
REFUSAL = re.compile(r"KaraConfigError: (.*)")


def read(path):
    return open(path, errors="replace").read() if os.path.exists(path) else ""


def rc(name):
    return read(os.path.join(out, f"rc-{name}.txt")).strip() or "not run"


print("== tests (tests/test_sglang_mla.py, tests/test_sglang_swa.py):", rc("tests"))
text = read(os.path.join(out, "tests.txt"))
lines = text.splitlines()
for line in lines:
    if re.match(r"(FAILED|ERROR|SKIPPED)\b", line):
        print("  " + line[:300])
print("  " + (next((l for l in reversed(lines) if re.search(r"passed|failed|error|skipped|no tests ran", l)), "(no result line)")))

print("\n== serving smokes (bench_serving.py, dummy weights)")
for name in ("deepseek-v3-cut-kara", "deepseek-v3-cut-vanilla", "gpt-oss-20b-vanilla", "gpt-oss-20b-kara"):
    log = read(os.path.join(out, f"log-{name}.txt"))
    kara = name.endswith("-kara")
    env = next((json.loads(l[len("BENCH-ENV "):]) for l in log.splitlines() if l.startswith("BENCH-ENV ")), None)
    rows = json.loads(read(os.path.join(out, f"row-{name}.json")) or "[]")
    measured = log.split("BENCH-START", 2)[-1] if log.count("BENCH-START") >= 2 else ""
    decode = len(re.findall(r"Decode batch", measured))
    comp = re.findall(r"kara: compressions (\d+), tokens evicted (\d+)", log)
    errors = [l for l in log.splitlines() if ERROR.search(l) and not BENIGN.search(l)]
    refusal = REFUSAL.search(log)
    if refusal:
        verdict = "REFUSED at start-up"
    elif not log:
        verdict = "NOT RUN"
    elif rows and not errors and (not kara or rows[-1].get("compression_events", 0) > 0):
        verdict = "OK"
    else:
        verdict = "FAILED" if errors or "rc=124" not in rc(name) else "CUT by its time limit"
    print(f"{name}: {verdict}; {rc(name)}")
    if not log:
        continue
    if env:
        print(f"  up: SGLang {env.get('sglang_version')}, {env.get('device')}, backend {env.get('attention_backend')}, "
              f"overlap {env.get('overlap')}, pool {env.get('max_total_tokens')} tokens")
    for r in rows:
        print(f"  row {r['workload']}: {r['output_tok_per_s']:.0f} tok/s, {r['num_requests']} requests, U {r.get('buffer')}, "
              f"peak running {r.get('peak_running_requests')}, peak KV {r.get('peak_kv_tokens')}, "
              f"compressions {r['compression_events']}, evicted {r['kv_tokens_evicted']}, retractions {r['retractions']}")
    print(f"  decode log lines in the measured workload: {decode}; last kara line: "
          + (f"compressions {comp[-1][0]}, tokens evicted {comp[-1][1]}" if comp else "none"))
    if refusal:
        print("  refusal: " + refusal.group(1)[:300])
    for line in errors[:6]:
        print("  error: " + line[:300])
EOF
ts "done; results in $OUT"
