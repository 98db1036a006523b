#!/usr/bin/env bash
# tools/gpu/tp-run.sh — tensor parallelism and collectives on a 2-GPU machine (issue #10), from
# the repo root with .devcarry/ carried (tools/gpu/prepare.sh). Every phase bounded; output
# under $OUT, a summary last. PHASES picks phases:
#   p  cuda-parity (every CUDA op against the CPU)
#   g  eval-golden --device cuda on every fixture, then --tp 2 on the ones whose widths split
#   c  comm-bench: NCCL send/recv + all-reduce and the peer one-shot all-reduce, 6 KB..192 KB
#   t  bench --synthetic $TP_MODEL --device cuda --tp 2 at $TP_CTX (default 4096) and, with
#      FULLCTX=1, at the model's full context
#   s  single-GPU bench of $S_MODEL (default minimax-m2.5:q4g64 at 4096)
#   h  test_cuda_host (GPU vs CPU forward; batched greedy decode on one GPU and on TP=2)
#   n  $CONC (default 32) sequences decoding together (bench --concurrency): $TP_MODEL on --tp 2
#      at $TP_CTX (every slot's KV filled synthetically), then $N_MODEL (default qwen3-8b:q4g64)
#      on one GPU with 64-token prompts (each slot prefilled)
set -uo pipefail
. "$(dirname "$0")/lib.sh"
gpu_setup tp 500
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PHASES=${PHASES:-pgct}
TP_MODEL=${TP_MODEL:-minimax-m2.5:q5g64}
TP_CTX=${TP_CTX:-4096}
S_MODEL=${S_MODEL:-minimax-m2.5:q4g64}
SUM="$OUT/summary.md"
echo "| phase | rc | seconds | result |" > "$SUM"
echo "|---|---|---|---|" >> "$SUM"
phase() {
  local name=$1 need=$2 limit=$3; shift 3
  local l; l=$(left)
  if [ "$l" -lt "$need" ]; then echo "| $name | skipped | 0 | ${l}s left |" >> "$SUM"; return; fi
  [ "$limit" -gt "$l" ] && limit=$l
  echo "== $name (limit ${limit}s)"
  local t0; t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$OUT/$name.log"
  local res
  res=$(grep -E "cases,|golden \(cuda|passed|tok/s|FAILED|error" "$OUT/$name.log" | tail -n 2 | tr '\n' ' ' | tr '|' '/')
  echo "| $name | $rc | $(( $(date +%s) - t0 )) | $res |" >> "$SUM"
}
nvidia-smi -L | tee "$OUT/gpus.txt"
NG=$(nvidia-smi -L | wc -l)
case $PHASES in *p*) phase cuda-parity 30 120 "$S" cuda-parity ;; esac
case $PHASES in *h*) [ -x "$C/bin/test_cuda_host" ] && phase test_cuda_host 30 120 "$C/bin/test_cuda_host" ;; esac
golden() {
  local fail=0 n=0
  for d in "$C"/fixtures/models/*/; do
    n=$((n + 1)); echo "---- $d"; "$S" eval-golden "$d" --device cuda > /tmp/g1.log 2>&1 || fail=$((fail + 1))
    grep -E "FAIL|strata:|agreement" /tmp/g1.log
  done
  if [ "$NG" -ge 2 ]; then
    for d in "$C"/fixtures/models/*/; do
      echo "---- tp 2: $d"
      "$S" eval-golden "$d" --device cuda --tp 2 > /tmp/tpg.log 2>&1; rc=$?
      grep -E "FAIL|strata:|agreement" /tmp/tpg.log
      if grep -q "do not split\|not a multiple\|do not divide" /tmp/tpg.log; then echo "(refused: widths do not split)"; continue; fi
      n=$((n + 1)); [ $rc -eq 0 ] || fail=$((fail + 1))
    done
  fi
  echo "golden runs: $fail of $n failed (passed $((n - fail)))"
  return $fail
}
export -f golden; export S C NG
case $PHASES in *g*) phase eval-golden 30 180 bash -c golden ;; esac
case $PHASES in *c*) [ "$NG" -ge 2 ] && phase comm-bench 20 90 "$S" comm-bench --gpus 2 --json "$OUT/comm-bench.json" ;; esac
case $PHASES in *t*) [ "$NG" -ge 2 ] && phase "bench-tp2-${TP_MODEL//:/-}-ctx$TP_CTX" 60 200 "$S" bench --synthetic "$TP_MODEL" --device cuda --tp 2 --context "$TP_CTX" --prompt 256 --gen 128 --out "$OUT/bench-tp2-$TP_CTX" ;; esac
case $PHASES in *t*) [ "${FULLCTX:-0}" = 1 ] && [ "$NG" -ge 2 ] && phase "bench-tp2-fullctx" 90 240 "$S" bench --synthetic "$TP_MODEL" --device cuda --tp 2 --context 196608 --prompt 256 --gen 64 --out "$OUT/bench-tp2-full" ;; esac
CONC=${CONC:-32}
N_MODEL=${N_MODEL:-qwen3-8b:q4g64}
case $PHASES in *n*) [ "$NG" -ge 2 ] && phase "bench-tp2-conc$CONC" 60 240 "$S" bench --synthetic "$TP_MODEL" --device cuda --tp 2 --context "$TP_CTX" --prompt 256 --gen 64 --concurrency "$CONC" --out "$OUT/bench-tp2-conc$CONC" ;; esac
case $PHASES in *n*) phase "bench-1gpu-conc$CONC-${N_MODEL//:/-}" 60 180 "$S" bench --synthetic "$N_MODEL" --device cuda --prompt 64 --gen 64 --concurrency "$CONC" --out "$OUT/bench-1gpu-conc$CONC" ;; esac
case $PHASES in *s*) phase "bench-1gpu-${S_MODEL//:/-}" 60 150 "$S" bench --synthetic "$S_MODEL" --device cuda --context 4096 --prompt 256 --gen 128 --out "$OUT/bench-1gpu" ;; esac
echo; echo "== summary (total $(( $(date +%s) - T_START )) s)"; cat "$SUM"
