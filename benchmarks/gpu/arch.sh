#!/usr/bin/env bash
# Kara on MLA, MoE and hybrid sliding-window models: vanilla SGLang at its fastest against Kara
# 25% and 12.5%, one H200 per configuration where there are several.
#   pip install -e ".[sglang]" && bash benchmarks/gpu/arch.sh [SHAPE ...]
# SHAPE: deepseek-v3-cut, deepseek-v2-lite, gpt-oss-20b (default: all three; bench_serving.py
# --model-shape, defined in benchmarks/model_shapes.py), each with dummy weights (nothing to
# download). As headline.sh: SGLang's defaults (no --attention-backend, overlap scheduling on,
# decode CUDA graphs), prefill CUDA graphs off for all alike, 1024-token prompts and 16,384
# output tokens, all requests at once, each configuration offered as many requests as its pool
# holds at the KV SGLang reserves for each (vanilla prompt + output, Kara its growth bound), at
# most 255 (SGLang ran 255 at once under --max-running-requests 256 in the headline FP8 waves).
#
# Pools and request counts come from benchmarks/arch_bytes_model.py --counts, and every pool is
# pinned with --max-total-tokens so the counts fit it exactly (SGLang takes the smaller of the
# pin and what the GPU holds; a row records the pool it got in max_total_tokens):
#   deepseek-v3-cut   DeepSeek-V3's dimensions cut to 4 layers (bf16), the pool of one GPU of a
#                     TP 8 deployment (fp8 weights): 599,333 tokens; why: arch_bytes_model.py.
#   deepseek-v2-lite  the whole model; 90% of the pool the bytes model expects on the GPU (that
#   gpt-oss-20b       estimate comes from the Llama runs' memory; an MoE's workspace differs),
#                     gpt-oss-20b with Kara's U = 128 (the server's default there: U must cover the sliding window).
# POOL_<SHAPE> overrides a pool (e.g. POOL_gpt_oss_20b=1500000; the counts follow it). The pools
# of V2-Lite and gpt-oss are the GPU's (nvidia-smi's name: an H200 or an H100 80GB).
#
# --plan prints the configurations (one "NAME:SECONDS:ARGS" a line) instead of running them, for
# a leased GPU (benchmarks/gpu/run_lease.sh serve takes them):
#   mapfile -t C < <(bash benchmarks/gpu/arch.sh --plan gpt-oss-20b); bash benchmarks/gpu/run_lease.sh serve "${C[@]}"
#
# With N GPUs the configurations run side by side, one GPU each, round robin (nine on eight
# GPUs: the ninth after the first on GPU 0); with one, in order. SECONDS_EACH bounds each
# configuration (default 1800); a cut one keeps its log, from which report_throughput.py
# derives a partial row. Rows and logs go to $OUT (default out/arch); at the end the whole-wave
# table and the first 80% of each wave's tokens are printed. Into docs/results/throughput.json
# (rows carry model, attention_backend, kv_cache_dtype, overlap):
#   cp -r out/arch docs/results/raw-DATE-h200-arch && python benchmarks/report_throughput.py docs/results/raw-DATE-h200-arch
set -uo pipefail
source benchmarks/gpu/env.sh  # python3 that imports sglang and kara_sglang (the counts need Kara's policy); OUT
export OUT
SECONDS_EACH=${SECONDS_EACH:-1800}
COMMON="--attention-backend default --overlap on --disable-prefill-cuda-graph"
NGPU=$(nvidia-smi -L 2> /dev/null | wc -l)
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2> /dev/null | head -1)
PLAN=0
[ "${1:-}" = --plan ] && { PLAN=1; shift; }
shapes=("$@")
[ ${#shapes[@]} -gt 0 ] || shapes=(deepseek-v3-cut deepseek-v2-lite gpt-oss-20b)

configs=()
lane=0
add() {  # NAME ARGS: a configuration for run_serving.sh, on the next GPU with 2+ GPUs
  local gpu=""
  [ "$NGPU" -ge 2 ] && gpu="@$(( lane % NGPU ))"
  lane=$(( lane + 1 ))
  configs+=("$1$gpu:$SECONDS_EACH:$2")
}
for shape in "${shapes[@]}"; do
  counts=$(python3 benchmarks/arch_bytes_model.py --counts "$shape" --device "${DEVICE:-NVIDIA H200}") || exit 1
  read -r pool _ <<<"$counts"
  [ "$shape" = deepseek-v3-cut ] || pool=$(( pool * 9 / 10 ))
  override=POOL_${shape//-/_}
  pool=${!override:-$pool}
  read -r pool v k25 k125 <<<"$(python3 benchmarks/arch_bytes_model.py --counts "$shape" --pool "$pool")"
  [ -n "$k125" ] || exit 1
  # No --buffer: Kara's defaults, U = 64, and on gpt-oss 128 (the server's, covering its window),
  # which arch_bytes_model.py's counts assume.
  S="--model-shape $shape --max-total-tokens $pool $COMMON"
  echo "$shape: pool $pool tokens; vanilla $v, Kara 25% $k25, Kara 12.5% $k125 requests" >&2
  add "$shape-vanilla" "--policy none $S --workload ${v}x1024+16384"
  add "$shape-kara25" "--policy kara --keep-ratio 0.25 $S --workload ${k25}x1024+16384"
  add "$shape-kara125" "--policy kara --keep-ratio 0.125 $S --workload ${k125}x1024+16384"
done
[ $PLAN = 1 ] && { printf '%s\n' "${configs[@]}"; exit 0; }
bash benchmarks/gpu/run_serving.sh "${configs[@]}" || exit 1

python3 - "$OUT" <<'EOF'
import glob, json, os, sys
rows = {}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "row-*.json"))):
    for r in json.load(open(path)):
        if r["output_len"] == 16384:
            rows[os.path.basename(path)[4:-5]] = r
print(f"\n{'configuration':26} {'backend':10} {'requests':>8} {'tok/s (whole wave)':>19} {'vs vanilla':>10} {'mean ITL':>9}")
for name, r in rows.items():
    base = rows.get(name.rsplit("-", 1)[0] + "-vanilla")
    gain = f"{r['output_tok_per_s'] / base['output_tok_per_s']:.2f}x" if base else "-"
    print(f"{name:26} {r['attention_backend']:10} {r['num_requests']:8} {r['output_tok_per_s']:19,.0f} {gain:>10} "
          f"{r.get('itl_mean_ms') or 0:7.1f} ms")
print("(a configuration without a row here was cut by SECONDS_EACH or failed: see its log and the 80% rates below)")
EOF
echo; echo "first 80% of each wave's tokens (SGLang's decode log):"
python3 benchmarks/report_throughput.py "$OUT" --upto 0.8
echo; echo "the bytes model's prediction: python3 benchmarks/arch_bytes_model.py --device \"$DEVICE\""
