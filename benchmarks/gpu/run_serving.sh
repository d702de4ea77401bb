#!/usr/bin/env bash
# On the GPU machine: install the carried wheels once (kept in /tmp while the machine stays
# warm), then run bench_serving.py for each configuration given as an argument, e.g.
#   bash benchmarks/gpu/run_serving.sh "none" "kara 0.25" "kara 0.125" "threshold - 2048"
# Each configuration runs in its own process; rows and logs go to $OUT.
set -uo pipefail
SITE=/tmp/site
if [ ! -f $SITE/.done ]; then
  mkdir -p /tmp/wheels/dl
  cat /tmp/wheels/part-* | tar -C /tmp/wheels/dl -xf - || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target $SITE /tmp/wheels/dl/*.whl 2>&1 | grep -v "already exists" ; [ -d $SITE/sglang ] || exit 1
  python3 -c "import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" /tmp/wheels/dl/sgl_kernel_slim.zip $SITE || exit 1
  touch $SITE/.done
fi
python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $SITE .whl/kara/*.whl 2>&1 | grep -v "already exists"
export PYTHONPATH=$SITE PYTHONUNBUFFERED=1
WORKLOADS=${WORKLOADS:-"--workload 3*128x128+448 --workload 128x1024+8192"}
for config in "$@"; do
  read -r policy ratio budget <<<"$config"
  name="${policy}-${ratio:-}-${budget:-}"
  extra=""
  [ -n "${ratio:-}" ] && [ "$ratio" != "-" ] && extra="$extra --keep-ratio $ratio"
  [ -n "${budget:-}" ] && extra="$extra --budget $budget"
  echo "=== $name"
  timeout ${CONFIG_TIMEOUT:-420} python3 benchmarks/bench_serving.py --policy $policy $extra $WORKLOADS \
    --log-file $OUT/log-$name.txt --out $OUT/row-$name.json > $OUT/log-$name.txt 2>&1
  echo "rc=$?"; grep -E '^\{|Error|error:' $OUT/log-$name.txt | tail -5
done
