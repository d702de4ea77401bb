#!/usr/bin/env bash
# The offline path (docs/offline.md): SGLang's wheels carried to a GPU host without a package
# index in parts of 46 MiB (fetch_wheels.sh), FlashAttention-3 in parts (fetch_fa3.sh) and this
# repo's wheel (.whl/kara), installed into /tmp/site once the parts are all there. Parts carried
# in earlier calls wait in /tmp/wheels and /tmp/fa3 while the machine stays warm. A host with
# pip and an index needs none of this: `pip install -e ".[sglang]"` (benchmarks/gpu/env.sh).
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
true
