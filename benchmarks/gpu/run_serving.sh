#!/usr/bin/env bash
# One bench_serving.py process (one server start-up) per configuration, rows and logs in $OUT:
#   bash benchmarks/gpu/run_serving.sh "NAME:SECONDS:BENCH_SERVING_ARGS" ...
# e.g. "kara:900:--policy kara --keep-ratio 0.25 --attention-backend default --overlap on --workload 148x1024+16384"
# SECONDS bounds that configuration (a killed run keeps the rows it finished and its log,
# from which report_throughput.py derives the partial workload). Needs `pip install -e ".[sglang]"`
# in the active environment (benchmarks/gpu/env.sh; the offline path: docs/offline.md).
# benchmarks/gpu/headline.sh runs the README's table through this script.
set -uo pipefail
source benchmarks/gpu/env.sh
# A configuration named NAME@G runs on GPU G (CUDA_VISIBLE_DEVICES); the configurations of
# each GPU run one after another, different GPUs side by side (a 2-GPU machine measures two
# policies per call). Without @G everything runs in order on the default devices.
run_config() {
  IFS=: read -r name seconds args <<<"$1"
  name=${name%@*}  # files are named without the GPU
  echo "=== $name ($seconds s): $args"
  local t0=$(date +%s)
  timeout "$seconds" python3 benchmarks/bench_serving.py $args \
    --log-file $OUT/log-$name.txt --out $OUT/row-$name.json > $OUT/log-$name.txt 2>&1
  echo "$name rc=$? after $(( $(date +%s) - t0 )) s"; grep -E '^\{|Error|error:' $OUT/log-$name.txt | cut -c1-300 | tail -6
}
declare -A lanes
for config in "$@"; do
  name=${config%%:*}
  if [[ $name == *@* ]]; then lanes[${name##*@}]+="$config"$'\n'; else run_config "$config"; fi
done
for gpu in "${!lanes[@]}"; do
  ( export CUDA_VISIBLE_DEVICES=$gpu
    while IFS= read -r config; do [ -n "$config" ] && run_config "$config"; done <<<"${lanes[$gpu]}"
  ) > $OUT/lane-gpu$gpu.txt 2>&1 &
done
wait
cat $OUT/lane-gpu*.txt 2>/dev/null; true
