#!/usr/bin/env bash
# The README's throughput table on your GPU host: vanilla SGLang at its fastest against Kara.
#   pip install -e ".[sglang]" && bash benchmarks/gpu/headline.sh [bf16|fp8|all]   (default bf16)
#
# Every configuration runs with SGLang's defaults (no --attention-backend: FlashAttention-3 on
# Hopper; overlap scheduling on; decode CUDA graphs), prefill CUDA graphs off for all alike, a
# Llama-3.1-8B-shaped model with dummy weights (nothing to download), 1024-token prompts and
# 16,384 output tokens, all requests at once, each configuration offered as many requests as
# its KV pool holds at their peak: pool / 17,408 tokens for vanilla, / 5,696 for Kara 25%,
# / 3,648 for Kara 12.5% (W = 512, U = 64), at most SGLang's --max-running-requests 256.
# The defaults are the H200's counts (141 GB, --mem-fraction-static 0.85: 845,617 bf16 KV
# tokens, 1,691,234 FP8); on another GPU read max_total_num_tokens from the first server's log
# ($OUT/log-*.txt) and set the counts (V_BF16, K25_BF16, K125_BF16, V_FP8, K25_FP8, K125_FP8).
#
# bf16: vanilla, Kara 25%, Kara 12.5% (about 5 + 6 + 7 minutes of decoding on an H200, plus about
# 2 minutes of start-up each);
# fp8: the same three with --kv-cache-dtype fp8_e4m3; all: both; recall: vanilla, Kara 12.5%, and
# Kara 12.5% + a 4-bit GPU tier of evicted KV (R 256) holding every request's evicted tokens, the
# pool and tier together at most the bytes of vanilla's pool (392,000 bf16 tokens of 128 KiB:
# 100 requests' peak of 3,904 with the 256-token recall buffer; + 1,420,000 tier tokens of 40 KiB
# at the Llama-8B shape: 100 x ~14,000 evicted), 100 requests, context length 17,500 (each
# step ranks a row's tier tokens over the row's width inside the CUDA graph). With two or more GPUs, vanilla
# runs on GPU 0 and Kara on GPU 1, side by side. SECONDS_EACH bounds each configuration (default
# 1800); horizon: vanilla, then Kara 12.5% and 25% + that tier bounded to each request's last
# 4,096 evicted tokens (counts in its block below). Rows and logs go to $OUT (default
# out/headline); the table is printed at the end (whole-wave rate as the client measured it,
# then the first 80% of each wave's tokens from SGLang's decode log, the measure that compares
# waves cut short).
set -uo pipefail
WHICH=${1:-bf16}
OUT=${OUT:-$PWD/out/headline}
export OUT
SECONDS_EACH=${SECONDS_EACH:-1800}
V_BF16=${V_BF16:-48} K25_BF16=${K25_BF16:-148} K125_BF16=${K125_BF16:-231}
V_FP8=${V_FP8:-96} K25_FP8=${K25_FP8:-256} K125_FP8=${K125_FP8:-256}
COMMON="--attention-backend default --overlap on --disable-prefill-cuda-graph"
NGPU=$(nvidia-smi -L 2> /dev/null | wc -l)
on() { [ "$NGPU" -ge 2 ] && echo "@$1"; }  # GPU suffix for run_serving.sh, only with 2+ GPUs
VANILLA_BF16="vanilla-bf16$(on 0):$SECONDS_EACH:--policy none $COMMON --workload ${V_BF16}x1024+16384"  # bf16, recall, horizon

configs=()
if [ "$WHICH" = bf16 ] || [ "$WHICH" = all ]; then
  configs+=("$VANILLA_BF16"
            "kara25-bf16$(on 1):$SECONDS_EACH:--policy kara --keep-ratio 0.25 $COMMON --workload ${K25_BF16}x1024+16384"
            "kara125-bf16$(on 1):$SECONDS_EACH:--policy kara --keep-ratio 0.125 $COMMON --workload ${K125_BF16}x1024+16384")
fi
if [ "$WHICH" = fp8 ] || [ "$WHICH" = all ]; then
  F="--kv-cache-dtype fp8_e4m3"
  configs+=("vanilla-fp8$(on 0):$SECONDS_EACH:--policy none $F $COMMON --workload ${V_FP8}x1024+16384"
            "kara25-fp8$(on 1):$SECONDS_EACH:--policy kara --keep-ratio 0.25 $F $COMMON --workload ${K25_FP8}x1024+16384"
            "kara125-fp8$(on 1):$SECONDS_EACH:--policy kara --keep-ratio 0.125 $F $COMMON --workload ${K125_FP8}x1024+16384")
fi
if [ "$WHICH" = recall ]; then
  T125=${T125:-100} TIER=${TIER:-1420000} TIER_POOL=${TIER_POOL:-392000}
  configs+=("$VANILLA_BF16"
            "kara125-bf16$(on 1):$SECONDS_EACH:--policy kara --keep-ratio 0.125 $COMMON --workload ${K125_BF16}x1024+16384"
            "tier125-bf16$(on 1):$SECONDS_EACH:--policy kara --keep-ratio 0.125 --recall-tokens 256 --recall-tier-tokens $TIER --recall-kv bits4 --max-total-tokens $TIER_POOL --context-length 17500 $COMMON --workload ${T125}x1024+16384")
fi
if [ "$WHICH" = horizon ]; then
  # vanilla, then Kara 25% and 12.5% + the 4-bit tier bounded to each request's last HORIZON
  # evicted tokens, two-stage ranking (64 pages), each at the bytes of vanilla's pool. Per
  # request the pool reserves Kara's growth bound plus the 256-token recall buffer (5,952 at
  # 25%, 3,904 at 12.5%) and the tier H tokens at 5/16 of bf16 plus one bf16 token of page
  # bounds per 16. At H 4,096 on an H200: 112 requests (pool 667,000, tier 460,000) at 25%, 155
  # (605,200 + 635,000) at 12.5%; on an H100 80GB (vanilla 24 requests): H25=56 H_POOL=334000
  # H_TIER=230000 H125=77 H125_POOL=301000 H125_TIER=316000. H_PAGES=16: Quest's own selection.
  H25=${H25:-112} H_POOL=${H_POOL:-667000} H_TIER=${H_TIER:-460000} HORIZON=${HORIZON:-4096}
  H125=${H125:-155} H125_POOL=${H125_POOL:-605200} H125_TIER=${H125_TIER:-635000}
  TIER_ARGS="--recall-tokens 256 --recall-kv bits4 --recall-pages ${H_PAGES:-64} --recall-horizon $HORIZON --context-length 17500 $COMMON"
  configs+=("$VANILLA_BF16"
            "horizon125-bf16$(on 1):$SECONDS_EACH:--policy kara --keep-ratio 0.125 --recall-tier-tokens $H125_TIER --max-total-tokens $H125_POOL $TIER_ARGS --workload ${H125}x1024+16384"
            "horizon25-bf16$(on 1):$SECONDS_EACH:--policy kara --keep-ratio 0.25 --recall-tier-tokens $H_TIER --max-total-tokens $H_POOL $TIER_ARGS --workload ${H25}x1024+16384")
fi
[ ${#configs[@]} -gt 0 ] || { echo "usage: headline.sh [bf16|fp8|all|recall|horizon]"; exit 2; }
bash benchmarks/gpu/run_serving.sh "${configs[@]}" || exit 1

python3 - "$OUT" <<'EOF'
import glob, json, os, sys
out = sys.argv[1]
rows = {}
for path in sorted(glob.glob(os.path.join(out, "row-*.json"))):
    for r in json.load(open(path)):
        if r["output_len"] == 16384:
            rows[os.path.basename(path)[4:-5]] = r
print(f"\n{'configuration':16} {'KV':9} {'requests':>8} {'tok/s (whole wave)':>19} {'vs vanilla, same KV':>20} {'mean ITL':>9}")
for name, r in rows.items():
    dtype = "fp8_e4m3" if "fp8" in name else "bf16"
    base = rows.get(f"vanilla-{'fp8' if 'fp8' in name else 'bf16'}")
    gain = f"{r['output_tok_per_s'] / base['output_tok_per_s']:.2f}x" if base else "-"
    print(f"{name:16} {dtype:9} {r['num_requests']:8} {r['output_tok_per_s']:19,.0f} {gain:>20} "
          f"{r.get('itl_mean_ms') or 0:7.1f} ms")
print("(a configuration without a row here was cut by SECONDS_EACH: see its log and the 80% rates below)")
EOF
echo; echo "first 80% of each wave's tokens (SGLang's decode log):"
python3 benchmarks/report_throughput.py "$OUT" --upto 0.8
