# Sourced by the GPU scripts (benchmarks/gpu/*.sh): which Python runs SGLang, and where results go.
#
# A GPU host with pip and an index (the usual case): `pip install -e ".[sglang]"` (plus the
# extras a script names: test, router, fidelity) in the active environment; python3 on PATH
# must import sglang and kara_sglang. Nothing is installed here.
#
# The offline path (docs/offline.md), taken when the working tree has a .whl/ folder or an
# earlier call installed /tmp/site: offline_install.sh installs the carried wheel parts into
# /tmp/site, which goes first on PYTHONPATH.
#
# OUT: results folder (default out/<script name>, created); the scripts write rows and logs there.
OUT=${OUT:-$PWD/out/$(basename "${0%.sh}")}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ] || [ -f /tmp/site/.done ]; then
  KARA_OFFLINE=1
  bash benchmarks/gpu/offline_install.sh || exit 1
  [ -f /tmp/site/.done ] || { echo "offline install incomplete (docs/offline.md)"; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH  # bin: ninja for FlashInfer's JIT
else
  KARA_OFFLINE=0
  python3 -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('sglang') and u.find_spec('kara_sglang')))" || {
    echo "python3 ($(command -v python3)) cannot import sglang and kara_sglang: run pip install -e \".[sglang]\" in this"
    echo "environment first (or follow docs/offline.md on a host without a package index)"; exit 1; }
fi
export KARA_OFFLINE
