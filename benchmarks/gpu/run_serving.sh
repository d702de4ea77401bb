#!/usr/bin/env bash
# On the GPU machine: install the carried wheels once (kept in /tmp while the machine stays
# warm), then run one bench_serving.py process (one server start-up) per configuration:
#   bash benchmarks/gpu/run_serving.sh "NAME:SECONDS:BENCH_SERVING_ARGS" ...
# e.g. "kara:560:--policy kara --workload 96x1024+8192~kara,keep=0.25 --workload 96x1024+8192~kara,keep=0.125"
# SECONDS bounds that configuration (a killed run keeps the rows it finished and its log,
# from which report_throughput.py derives the partial workload). Rows and logs go to $OUT.
# FlashAttention-3 (SGLang's default backend on Hopper) comes separately: fetch_fa3.sh's
# .whl/fa3/part-* and MANIFEST, carried one or two parts per call (each call, configurations
# or none, stores what it carries in /tmp/fa3); once all are there it is installed into $SITE.
set -uo pipefail
SITE=/tmp/site
if [ -f .whl/fa3/MANIFEST ] && [ ! -f $SITE/.fa3-done ]; then
  mkdir -p /tmp/fa3 && cp .whl/fa3/MANIFEST /tmp/fa3/
  for f in .whl/fa3/part-*; do [ -f "$f" ] && cp "$f" /tmp/fa3/ && echo "fa3: stored $f"; done
fi
if [ ! -f $SITE/.done ]; then
  t0=$(date +%s)
  mkdir -p /tmp/wheels/dl
  # Parts carried in this call (e.g. .whl/parts/part-ad) join those earlier calls left.
  for f in .whl/parts/part-*; do [ -f "$f" ] && cp "$f" /tmp/wheels/; done
  cat /tmp/wheels/part-* | tar -C /tmp/wheels/dl -xf - || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE /tmp/wheels/dl/*.whl 2>&1 | grep -v "already exists" ; [ -d $SITE/sglang ] || exit 1
  python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" /tmp/wheels/dl/sgl_kernel_slim.zip $SITE || exit 1
  touch $SITE/.done
  echo "installed wheels in $(( $(date +%s) - t0 )) s"
fi
if [ -f /tmp/fa3/MANIFEST ] && [ ! -f $SITE/.fa3-done ]; then
  read -r nparts sha < /tmp/fa3/MANIFEST
  have=$(ls /tmp/fa3 | grep -c '^part-')
  if [ "$have" -lt "$nparts" ]; then
    echo "fa3: $have of $nparts parts in /tmp/fa3, not installed yet (no fa3 backend in this call)"
  else
    t0=$(date +%s) so=$SITE/sgl_kernel/flash_ops.abi3.so
    cat /tmp/fa3/part-* | PYTHONPATH=$SITE python3 -c "import sys, zstandard
zstandard.ZstdDecompressor().copy_stream(sys.stdin.buffer, open(sys.argv[1], 'wb'))" $so.tmp
    if [ "$(sha256sum $so.tmp | cut -d' ' -f1)" = "$sha" ]; then
      mv $so.tmp $so && touch $SITE/.fa3-done && echo "fa3: installed $so in $(( $(date +%s) - t0 )) s"
    else
      rm -f $so.tmp; echo "fa3: sha256 mismatch after joining $have parts; not installed"; exit 1
    fi
  fi
fi
[ -d .whl/kara ] && python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $SITE .whl/kara/*.whl 2>&1 | grep -v "already exists"
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1 PATH=$SITE/bin:$PATH  # $SITE/bin: ninja for FlashInfer's JIT
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
