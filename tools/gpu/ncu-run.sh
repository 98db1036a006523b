#!/usr/bin/env bash
# tools/gpu/ncu-run.sh — per-kernel hardware figures of decode steps (issue #8), from the repo root
# on the GPU machine with .devcarry/ carried (tools/gpu/prepare.sh). For each MODELS entry
# (PRESET:QUANT[@extra,bench,args]) it runs `strata bench --synthetic ... --device cuda` under
# Nsight Compute, skips SKIP matching kernel launches (prefill and the first decode steps) and
# profiles COUNT kernels of the decode graph replays (graph nodes profiled one by one, caches
# flushed before each, clocks left alone): duration, DRAM bytes and throughput, occupancy,
# registers, grid. Raw CSV per model under $OUT, plus a per-kernel summary (tools/gpu/ncu-sum.py).
# ncu serialises the kernels, so a duration is the kernel alone — no PDL overlap with its
# neighbours: the sum over a step is an upper bound of the graph replay's time.
set -uo pipefail
. "$(dirname "$0")/lib.sh"
gpu_setup ncu 300
MODELS=${MODELS:-"qwen3-8b:q4g64"}
SKIP=${SKIP:-1500}
COUNT=${COUNT:-450}
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "ncu-run: no ncu on this machine"; exit 1; }
echo "ncu: $NCU ($("$NCU" --version | tail -1))"
METRICS=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__grid_size,launch__block_size,launch__registers_per_thread,launch__occupancy_limit_registers,lts__t_sector_hit_rate.pct
KRE='regex:^k_(mv|attn|add|qk|quant|rms|moe|swiglu|argmax|advance|embed|tp|rope|kv)'
for spec in $MODELS; do
  [ "$(left)" -gt 40 ] || { echo "skipped $spec: time"; continue; }
  model=${spec%%@*}
  extra=""; [[ $spec == *@* ]] && extra=$(tr ',' ' ' <<<"${spec#*@}")
  name=$(tr ':' '-' <<<"$model")
  echo "== $model $extra (skip $SKIP, count $COUNT, limit $(left) s)"
  # shellcheck disable=SC2086
  timeout "$(left)" "$NCU" --clock-control none --csv --page raw --metrics "$METRICS" --kernel-name-base function \
    --kernel-name "$KRE" --launch-skip "$SKIP" --launch-count "$COUNT" \
    "$S" bench --synthetic "$model" --device cuda --prompt 16 --gen 24 --no-max-context --context 1024 $extra \
    > "$OUT/ncu-$name.csv" 2> "$OUT/ncu-$name.err"
  echo "rc $? ($(wc -l < "$OUT/ncu-$name.csv") lines)"
  python3 tools/gpu/ncu-sum.py "$OUT/ncu-$name.csv" | tee "$OUT/ncu-$name.md"
done
