#!/usr/bin/env bash
# tools/gpu/device-run.sh — runs on the GPU machine from the repo root with .devcarry/ carried
# (made by tools/gpu/prepare.sh). Phases, each timed and bounded so the whole run stays under
# 8 minutes: nvidia-smi, test_cuda_host (GPU vs CPU forward on tiny presets), strata
# cuda-parity (incl. the whole MoE FFN for T = 1..200), strata comm-bench when >= 2 GPUs are
# visible (NCCL from the nvidia-nccl-cu13 Python package), eval-golden --device cuda on every
# fixture, then benches (qwen3-8b bf16 with a 2048-token prefill, qwen3-8b q4g64, qwen3-30b-a3b
# q4g64, and last, if time is left, minimax-m2.5 q4g64 at a 4096-token context with its ~120 GiB
# of weights generated on the device). Everything goes under $OUT; a summary table is printed
# last.
set -uo pipefail
. "$(dirname "$0")/lib.sh"
gpu_setup gpu 460
SUMMARY="$OUT/summary.md"
echo "| phase | rc | seconds | result |" > "$SUMMARY"
echo "|---|---|---|---|" >> "$SUMMARY"


# phase NAME NEED_S LIMIT_S CMD... : runs CMD with a timeout if NEED_S seconds are left
phase() {
  local name=$1 need=$2 limit=$3; shift 3
  local l; l=$(left)
  if [ "$l" -lt "$need" ]; then
    echo "| $name | skipped | 0 | only ${l}s left |" >> "$SUMMARY"; echo "== $name: skipped (${l}s left)"; return
  fi
  [ "$limit" -gt "$l" ] && limit=$l
  echo "== $name (limit ${limit}s)"
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  tail -n 40 "$OUT/$name.log"
  local res
  res=$(grep -E "cases,|golden \(cuda|passed|tok/s, MBU|PASSED|FAILED" "$OUT/$name.log" | tail -n 2 | tr '\n' ' ' | tr '|' '/')
  echo "| $name | $rc | $dt | $res |" >> "$SUMMARY"
}

echo "== nvidia-smi"; nvidia-smi 2>&1 | tee "$OUT/nvidia-smi.txt" | head -20
echo "== ldd"; ldd "$S" | grep -E "not found|cublas|cudart" | tee "$OUT/ldd.txt"

if [ -x "$C/bin/test_cuda_host" ]; then phase test_cuda_host 30 90 "$C/bin/test_cuda_host"; fi
phase cuda-parity 30 90 "$S" cuda-parity

# comm-bench (only with >= 2 GPUs): NCCL send/recv + all-reduce and the peer all-reduce, plain and
# in graphs. NCCL comes from the Python package nvidia-nccl-cu13 here (strata dlopens it).
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
if [ "${NGPU:-0}" -ge 2 ]; then
  PYNCCL=$(gpu_pylib nccl)
  phase comm-bench 20 90 env LD_LIBRARY_PATH="${PYNCCL:+$PYNCCL:}$LD_LIBRARY_PATH" \
    "$S" comm-bench --json "$OUT/comm-bench.json"
else
  echo "| comm-bench | skipped | 0 | ${NGPU:-0} GPU(s) visible, needs 2 |" >> "$SUMMARY"
fi

golden_all() {
  local fail=0 n=0
  for d in "$C"/fixtures/models/*/; do
    echo "---- $d"
    n=$((n + 2))
    "$S" eval-golden "$d" --device cuda || fail=$((fail + 1))
    "$S" eval-golden "$d" --device cuda --batch 7 > /tmp/golden7.log 2>&1 || fail=$((fail + 1))
    echo "(--batch 7) $(tail -n 1 /tmp/golden7.log)"
  done
  echo "golden fixtures: $fail of $n runs failed (passed $((n - fail)))"
  return $fail
}
export -f golden_all
export S C
phase eval-golden 30 120 bash -c golden_all

phase bench-qwen3-8b-bf16 120 200 "$S" bench --synthetic qwen3-8b:bf16 --device cuda --prompt 2048 --gen 128 --out "$OUT/bench-qwen3-8b-bf16"
phase bench-qwen3-8b-q4g64 100 170 "$S" bench --synthetic qwen3-8b:q4g64 --device cuda --prompt 512 --gen 128 --out "$OUT/bench-qwen3-8b-q4g64"
phase bench-qwen3-30b-a3b-q4g64 100 150 "$S" bench --synthetic qwen3-30b-a3b:q4g64 --device cuda --prompt 512 --gen 128 --out "$OUT/bench-qwen3-30b-a3b-q4g64"
phase bench-minimax-m2.5-q4g64 90 150 "$S" bench --synthetic minimax-m2.5:q4g64 --device cuda --context 4096 --prompt 256 --gen 128 --out "$OUT/bench-minimax-m2.5-q4g64"

echo
echo "== summary (total $(( $(date +%s) - T_START )) s)"
cat "$SUMMARY"
