#!/usr/bin/env bash
# FlashAttention-3 for the GPU machine (issue 17): fetch_wheels.sh drops
# sgl_kernel/flash_ops.abi3.so (1.12 GB) from the slim sglang-kernel; this ships it on its own,
# zstd -10 (187 MB) in parts of 46 MiB (one per device call, 64 MiB each with the tree) as
# .whl/fa3/part-aa, -ab, ... plus .whl/fa3/MANIFEST ("PARTS SHA256 of the .so"), which
# run_serving.sh uses to join, decompress (the carried zstandard wheel) and check them.
# Nothing else is needed: sgl_kernel/flash_attn.py imports only flash_ops, torch and
# sgl_kernel.debug_utils (in the slim zip); flash_ops links only torch/CUDA libraries.
#   bash benchmarks/gpu/fetch_fa3.sh          # WHL=/elsewhere/.whl to write there instead
set -euo pipefail
cd "$(dirname "$0")/../.."
whl=${WHL:-.whl}
out=$whl/fa3 tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$tmp" sglang-kernel==0.4.5
unzip -q -d "$tmp" "$tmp"/sglang_kernel-0.4.5-*.whl sgl_kernel/flash_ops.abi3.so
so=$tmp/sgl_kernel/flash_ops.abi3.so
if command -v zstd >/dev/null; then zstd -q -10 "$so" -o "$tmp/fo.zst"
else python3 -c "import sys, zstandard; zstandard.ZstdCompressor(level=10).copy_stream(open(sys.argv[1], 'rb'), open(sys.argv[2], 'wb'))" "$so" "$tmp/fo.zst"
fi
rm -rf "$out" && mkdir -p "$out"
split -b 46m "$tmp/fo.zst" "$out/part-"
echo "$(ls "$out" | grep -c '^part-') $(sha256sum "$so" | cut -d' ' -f1)" > "$out/MANIFEST"
ls -l "$out"; cat "$out/MANIFEST"
