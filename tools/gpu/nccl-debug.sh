#!/usr/bin/env bash
# tools/gpu/nccl-debug.sh — one 2-stage pipeline over an NCCL link between GPU 0 and GPU 1, with
# every node's log (NCCL_DEBUG=WARN) kept under $OUT: the short check to run first when the nccl
# modes of pipeline-run.sh misbehave. From the repo root with .devcarry/ carried and unpacked.
set -uo pipefail
. "$(dirname "$0")/lib.sh"
gpu_setup nccl-debug 0
M=${MODEL:-$C/fixtures/models/qwen3-bf16}
PYNCCL=$(gpu_pylib nccl)
export NCCL_DEBUG=${NCCL_DEBUG:-WARN} STRATA_CLUSTER_KEY="nccldbg-$$"
export STRATA_NCCL_TIMEOUT_MS=${STRATA_NCCL_TIMEOUT_MS:-5000}
echo "nccl lib dir: ${PYNCCL:-none} ($(ls "${PYNCCL:-/nonexistent}" 2>/dev/null | tr '\n' ' '))"
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done' EXIT
for i in 0 1; do
  rm -f "$OUT/port$i"
  "$S" node --listen 127.0.0.1:0 --port-file "$OUT/port$i" --no-bw-probe --device "cuda:$i" --sync-mode stream \
    --threads 8 > "$OUT/node$i.log" 2>&1 &
  pids+=($!)
done
for i in 0 1; do for _ in $(seq 200); do [ -s "$OUT/port$i" ] && break; sleep 0.05; done; done
P="127.0.0.1:$(cat "$OUT/port0"),127.0.0.1:$(cat "$OUT/port1")"
for run in 1 2; do
  timeout "${GEN_TIMEOUT:-60}" "$S" cluster-gen "$M" --peers "$P" --stages 2 --golden 3 --max-tokens 12 --xport nccl \
    > "$OUT/gen$run.out" 2> "$OUT/gen$run.err"
  echo "run $run: rc $? $(grep -o -m1 'link [a-z]*' "$OUT/gen$run.err") $(grep -E '^golden' "$OUT/gen$run.out")"
done
for i in 0 1; do echo "---- node $i"; grep -v "^$" "$OUT/node$i.log" | tail -25; done
for i in 0 1; do echo "---- gen $i err"; tail -8 "$OUT/gen$((i + 1)).err"; done
