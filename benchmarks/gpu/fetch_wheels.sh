#!/usr/bin/env bash
# Download (on a CPU machine with PyPI) everything SGLang 0.5.17 needs on the lent H100 that
# its image lacks, as cp312 wheels, slim the 383 MB sglang-kernel wheel to what the Triton /
# FlashInfer backends use, and pack it all into parts of 46 MiB for the device tool's
# 64 MiB-per-call limit (about 11 MB of it is the working tree); FlashAttention-3 comes from
# fetch_fa3.sh. Nothing here is committed: .whl/ is ignored.
# Recipe: ../shared/notes/gpu-sglang-recipe.md (measured 2026-11-22).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=.whl
mkdir -p "$out/dl" "$out/parts"
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux_2_34_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_31_x86_64 --platform manylinux_2_35_x86_64 --platform manylinux1_x86_64)
pkgs=(sglang==0.5.17 sglang-kernel==0.4.5 transformers==5.12.1 tokenizers==0.22.2 flashinfer-python==0.6.15.post1
      cuda-tile nccl4py nvidia-cudnn-frontend airportsdata annotated-doc annotated-types apache-tvm-ffi==0.1.11
      asttokens compressed-tensors==0.20.0 decorator dill diskcache distro executing fastapi gguf interegular
      ipython==9.18.1 ipython-pygments-lexers jedi jiter jsonschema jsonschema-specifications kernels==0.14.1
      kernels-data==0.16.2 lark loguru matplotlib-inline mistral_common msgspec nest-asyncio openai==2.6.1
      opentelemetry-api orjson outlines==0.1.11 outlines_core==0.1.26 parso partial_json_parser pexpect
      prompt_toolkit ptyprocess pure_eval pybase64 pycountry pydantic pydantic-core pydantic-extra-types
      python-multipart pyzmq referencing rpds-py setproctitle smg-grpc-servicer==0.14.1 sniffio stack_data
      starlette torch_memory_saver torchao==0.17.0 traitlets typing-inspection uvicorn watchfiles wcwidth
      xgrammar==0.2.1 zstandard smg-grpc-proto sentencepiece tiktoken ninja==1.13.2
      click einops nvidia-ml-py tabulate cuda-python cuda-bindings cuda-pathfinder)
for p in "${pkgs[@]}"; do
  ls "$out/dl" | grep -qi "^$(echo "${p%%==*}" | tr '-' '_' )-" && continue
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" -d "$out/dl" "$p" || python3 -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp "${plat[@]}" --platform any -d "$out/dl" "$p"
done
# Slim sglang-kernel: drop FlashAttention-3/MLA/sm100 objects (1.1 GB unpacked) we do not use.
kernel=$(ls $out/dl/sglang_kernel-*.whl)
rm -rf "$out/slim" && mkdir -p "$out/slim" && (cd "$out/slim" && unzip -q "../../$kernel" \
  && rm -rf sgl_kernel/flash_ops.abi3.so sgl_kernel/flashmla_ops.abi3.so sgl_kernel/sm100)
rm "$kernel"
(cd "$out/slim" && zip -qr ../dl/sgl_kernel_slim.zip .)
rm -rf "$out/slim"
# Parts of 46 MiB (one per call).
rm -f $out/parts/*
tar -C "$out/dl" -cf - . | split -b 46m - "$out/parts/part-"
ls -la "$out/parts"
du -sh "$out/dl"
