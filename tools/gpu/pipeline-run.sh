#!/usr/bin/env bash
# tools/gpu/pipeline-run.sh — the GPU-resident pipeline on the GPU machine (issue #9), from the
# repo root with .devcarry/ carried (tools/gpu/prepare.sh). Stage processes (`strata node
# --device cuda:N`) on loopback, every phase bounded:
#   1. correctness: fixture models through 1, 2 and 3 GPU stages (same GPU, separate
#      processes), and GPU + CPU stages: greedy ids against transformers' (golden) and logits
#      against the 1-stage GPU run;
#   2. figures: a synthetic qwen3-8b (bf16) decoded through 1/2/3 GPU stages in stream mode
#      (the stream raises a mapped flag, no host synchronisation) and host mode
#      (cudaStreamSynchronize + send): token time, per-stage compute, per-hop hand-off,
#      orchestration; then a GPU stage feeding a CPU stage;
#   3. with GPUS=2: the same model over two GPUs (one stage per GPU);
#   4. with GPUS=2: a step lost on an NCCL link (test hook): fallback, replay, GPUs still usable;
#   5. with GPUS=2: `strata bench $BENCH_MODEL --peers` over one stage per GPU (the seed's table:
#      latency, orchestration, per-stage residency, aggregate with 1/4/16/$CONC sequences) and the
#      stable context at $FULLCTX positions (default 196608: one slot, a real prefill through the
#      pipeline, decode latency at the end), for each of $MODES that is stream or nccl.
# MODES: stream, host (the hand-off over shm), nccl, nccl-host (hidden states between GPU stages
# over NCCL, `cluster-gen --xport nccl`, with stream / host sync), nccl-graph (nccl with the
# receive / send captured into the stage graphs: STRATA_NCCL_GRAPH=1 on the nodes). NCCL needs libnccl.so.2 on the
# library path or STRATA_NCCL_LIB. Phase 1 checks the nccl mode too (over two GPUs with GPUS=2;
# on one GPU only if NCCL accepts two ranks on one device, else a line says it was skipped), and
# every nccl row says whether the link really ran over NCCL ("link nccl" in its stats) or fell
# back (the node's warning quoted).
# Output under $OUT; a summary is printed last.
set -uo pipefail
. "$(dirname "$0")/lib.sh"
gpu_setup pipeline 420
GPUS=${GPUS:-1}
BENCH_MODEL=${BENCH_MODEL:-synthetic:qwen3-8b:bf16}
NTOK=${NTOK:-128}
PHASES=${PHASES:-1234}     # which of the phases below to run
MODES=${MODES:-stream host nccl nccl-graph}
export STRATA_NCCL_TIMEOUT_MS=${STRATA_NCCL_TIMEOUT_MS:-10000}
# NCCL (the nccl modes) from the Python package nvidia-nccl-cu13 when it is there (strata dlopens it)
export STRATA_CLUSTER_KEY="pipeline-$$"
tmp=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; pids=(); }
trap 'cleanup; rm -rf "$tmp"' EXIT
SUM="$OUT/summary.txt"
: > "$SUM"

# nodes MODE DEV1 DEV2 ... : starts one node per device ("cpu" or "cuda:N"), sets PEERS
nodes() {
  cleanup
  local mode=$1 i=0
  shift
  PEERS=""
  for dev in "$@"; do
    rm -f "$tmp/p$i"
    "$S" node --listen 127.0.0.1:0 --port-file "$tmp/p$i" --no-bw-probe --device "$dev" --sync-mode "$mode" \
      --threads 8 > "$OUT/node-$mode-$i-$dev.log" 2>&1 &
    pids+=($!)
    i=$((i + 1))
  done
  for j in $(seq 0 $((i - 1))); do
    for _ in $(seq 200); do [ -s "$tmp/p$j" ] && break; sleep 0.05; done
    PEERS="$PEERS${PEERS:+,}127.0.0.1:$(cat "$tmp/p$j")"
  done
}

gen() { timeout "${GEN_TIMEOUT:-120}" "$S" cluster-gen "$@"; }
graph_env() { if [[ $1 == *graph* ]]; then export STRATA_NCCL_GRAPH=1; else unset STRATA_NCCL_GRAPH; fi; }
sync_of() { [[ $1 == *host* ]] && echo host || echo stream; }       # MODE -> node --sync-mode
xport_of() { [[ $1 == nccl* ]] && echo "--xport nccl" || true; }   # MODE -> cluster-gen option
# ncclnote LOGPREFIX: why the nodes' NCCL links did not come up (their first warning), or ""
ncclnote() { grep -h -E "NCCL (link|offer)|NCCL: " "$OUT"/node-"$1"-*.log 2>/dev/null | grep -iE "warn|refused|declined|host copy" | head -1; }

echo "== nvidia-smi"; nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee "$OUT/gpu.txt"

echo "== 1. correctness" | tee -a "$SUM"
[[ $PHASES == *1* ]] && for m in qwen3-bf16 llama-mlx-q3g32-mixed qwen3_moe-mlx-q4g64 minimax_m2-mlx-q5g64; do
  d=$C/fixtures/models/$m
  [ -d "$d" ] || continue
  [ "$(left)" -gt 120 ] || { echo "skipped $m: time" | tee -a "$SUM"; continue; }
  nodes stream cuda:0 cuda:0 cuda:0
  r1=$(gen "$d" --peers "$PEERS" --stages 1 --golden 3 --max-tokens 12 --print-logits "$tmp/$m.ref" 2>"$OUT/c-$m-1.err")
  echo "$m 1 GPU stage: $(grep -E '^golden' <<<"$r1" | head -1)" | tee -a "$SUM"
  for st in 2 3; do
    r=$(gen "$d" --peers "$PEERS" --stages $st --golden 3 --max-tokens 12 --check-logits "$tmp/$m.ref" 2>"$OUT/c-$m-$st.err")
    echo "$m $st GPU stages: $(grep -E '^golden|^logits' <<<"$r" | tr '\n' ' ') ids $( [ "$(grep '^ids' <<<"$r")" = "$(grep '^ids' <<<"$r1")" ] && echo equal || echo DIFFER)" | tee -a "$SUM"
  done
  nodes host cuda:0 cuda:0
  r=$(gen "$d" --peers "$PEERS" --stages 2 --golden 3 --max-tokens 12 --check-logits "$tmp/$m.ref" 2>"$OUT/c-$m-host.err")
  echo "$m 2 GPU stages, host sync: $(grep -E '^golden|^logits' <<<"$r" | tr '\n' ' ')" | tee -a "$SUM"
  nodes stream cuda:0 cpu
  r=$(gen "$d" --peers "$PEERS" --stages 2 --golden 3 --max-tokens 12 --check-logits "$tmp/$m.ref" --rtol 3e-2 2>"$OUT/c-$m-mixed.err")
  echo "$m GPU + CPU stages: $(grep -E '^golden|^logits' <<<"$r" | tr '\n' ' ')" | tee -a "$SUM"
  # NCCL between GPU stages: logits against the 1-stage run, and the greedy (argmax on the GPU) ids
  # against the same prompt over shm; one GPU per stage with GPUS=2, else all on GPU 0
  if [ "$GPUS" -ge 2 ]; then devs="cuda:0 cuda:1"; else devs="cuda:0 cuda:0"; fi
  for st in 2 3; do
    [ $st = 3 ] && { [ "$GPUS" -ge 3 ] && devs="cuda:0 cuda:1 cuda:2" || devs="$devs cuda:0"; }
    nodes stream $devs
    r=$(gen "$d" --peers "$PEERS" --stages $st --golden 3 --max-tokens 12 --check-logits "$tmp/$m.ref" --xport nccl 2>"$OUT/c-$m-nccl$st.err")
    rg=$(gen "$d" --peers "$PEERS" --stages $st --golden 3 --max-tokens 12 --xport nccl 2>"$OUT/c-$m-nccl$st-greedy.err")
    link=$(grep -o -m1 'link [a-z]*' "$OUT/c-$m-nccl$st.err")
    note=$( [ "$link" = "link nccl" ] || echo "(fell back: $(ncclnote stream))" )
    echo "$m $st GPU stages ($devs), --xport nccl: $link $(grep -E '^golden|^logits' <<<"$r" | tr '\n' ' ') greedy $(grep -E '^golden' <<<"$rg") ids $( [ "$(grep '^ids' <<<"$rg")" = "$(grep '^ids' <<<"$r1")" ] && echo equal || echo DIFFER) $note" | tee -a "$SUM"
  done
  export STRATA_NCCL_GRAPH=1 # the receive / send inside the captured graphs
  nodes stream cuda:0 $( [ "$GPUS" -ge 2 ] && echo cuda:1 || echo cuda:0 )
  unset STRATA_NCCL_GRAPH
  r=$(gen "$d" --peers "$PEERS" --stages 2 --golden 3 --max-tokens 12 --check-logits "$tmp/$m.ref" --xport nccl 2>"$OUT/c-$m-nccl-graph.err")
  rg=$(gen "$d" --peers "$PEERS" --stages 2 --golden 3 --max-tokens 12 --xport nccl 2>/dev/null)
  echo "$m 2 GPU stages, --xport nccl, NCCL in the graphs: $(grep -o -m1 'link [a-z]*' "$OUT/c-$m-nccl-graph.err") $(grep -E '^golden|^logits' <<<"$r" | tr '\n' ' ') greedy ids $( [ "$(grep '^ids' <<<"$rg")" = "$(grep '^ids' <<<"$r1")" ] && echo equal || echo DIFFER) $(grep -h -m1 'graph capture' "$OUT"/node-stream-*.log)" | tee -a "$SUM"
  nodes host cuda:0 $( [ "$GPUS" -ge 2 ] && echo cuda:1 || echo cuda:0 )
  r=$(gen "$d" --peers "$PEERS" --stages 2 --golden 3 --max-tokens 12 --check-logits "$tmp/$m.ref" --xport nccl 2>"$OUT/c-$m-nccl-host.err")
  echo "$m 2 GPU stages, --xport nccl, host sync: $(grep -o -m1 'link [a-z]*' "$OUT/c-$m-nccl-host.err") $(grep -E '^golden|^logits' <<<"$r" | tr '\n' ' ')" | tee -a "$SUM"
  # a GPU stage feeding a CPU stage with --xport nccl: NCCL is declined, the shm path runs
  nodes stream cuda:0 cpu
  r=$(gen "$d" --peers "$PEERS" --stages 2 --golden 3 --max-tokens 12 --check-logits "$tmp/$m.ref" --rtol 3e-2 --xport nccl 2>"$OUT/c-$m-nccl-mixed.err")
  echo "$m GPU + CPU stages, --xport nccl: $(grep -o -m1 'link [a-z]*' "$OUT/c-$m-nccl-mixed.err") $(grep -E '^golden|^logits' <<<"$r" | tr '\n' ' ')" | tee -a "$SUM"
done

echo "== 2. figures: $BENCH_MODEL, $NTOK tokens" | tee -a "$SUM"
bench() { # LABEL STAGES [cluster-gen options] : cluster-gen on the running nodes, prints its stats lines
  local label=$1 st=$2
  shift 2
  GEN_TIMEOUT=200 gen "$BENCH_MODEL" --peers "$PEERS" --stages "$st" --prompt-ids 1,2,3,4,5,6,7,8 --max-tokens "$NTOK" \
    --no-eos --ctx "${CTX:-1024}" "$@" 2>&1 >/dev/null | grep -E '^stats' | sed "s/^stats:/$label:/" | tee -a "$SUM"
}
[[ $PHASES == *2* ]] && for mode in $MODES; do
  [ "$(left)" -gt 90 ] || { echo "skipped $mode: time" | tee -a "$SUM"; continue; }
  graph_env $mode
  nodes "$(sync_of $mode)" cuda:0 cuda:0 cuda:0
  for st in 1 2 3; do
    out=$(bench "$mode $st-stage" $st $(xport_of $mode))
    echo "$out"
    # stage processes sharing one GPU: NCCL may refuse two ranks on one device; then the figures
    # are the host copy path's, so they are not reported under the nccl label
    if [[ $mode == nccl* ]] && [ $st -gt 1 ] && ! grep -q "link nccl" <<<"$out"; then
      echo "$mode $st-stage on one GPU: skipped, NCCL did not connect: $(ncclnote "$(sync_of $mode)")" | tee -a "$SUM"
    fi
  done
done
unset STRATA_NCCL_GRAPH
if [[ $PHASES == *2* ]] && [ "$(left)" -gt 60 ]; then # a GPU stage feeding a CPU stage (small model)
  nodes stream cuda:0 cpu
  BENCH_MODEL=${MIXED_MODEL:-synthetic:qwen3-0.6b:bf16} NTOK=32 bench "gpu+cpu stream" 2
fi
if [[ $PHASES == *3* ]] && [ "$GPUS" -ge 2 ] && [ "$(left)" -gt 60 ]; then
  echo "== 3. two GPUs" | tee -a "$SUM"
  for mode in $MODES; do
    [ "$(left)" -gt 45 ] || { echo "skipped $mode 2 GPUs: time" | tee -a "$SUM"; continue; }
    graph_env $mode
    nodes "$(sync_of $mode)" cuda:0 cuda:1
    out=$(bench "$mode 2 GPUs" 2 $(xport_of $mode))
    echo "$out"
    if [[ $mode == nccl* ]] && ! grep -q "link nccl" <<<"$out"; then
      echo "$mode 2 GPUs: NCCL did not connect (figures above are the fallback's): $(ncclnote "$(sync_of $mode)")" | tee -a "$SUM"
    fi
  done
fi
unset STRATA_NCCL_GRAPH
# 4. (GPUS=2) a lost NCCL step: stage 1 drops its 20th header on NCCL without posting the receive
# (STRATA_TEST_NCCL_SKIP_RECV). Expected: stage 1 drops the link and tells stage 0; stage 0's send
# either completes or is aborted within STRATA_NCCL_TIMEOUT_MS (2 s here); both fall back to the
# host copy path, the coordinator's stall timer (10 s) replays, the ids equal an undisturbed run,
# and both GPUs stay usable (a 1-stage run on each afterwards).
if [[ $PHASES == *4* ]] && [ "$GPUS" -ge 2 ] && [ "$(left)" -gt 100 ]; then
  echo "== 4. a lost NCCL step" | tee -a "$SUM"
  SM=${STALL_MODEL:-synthetic:qwen3-0.6b:bf16}
  saved_to=$STRATA_NCCL_TIMEOUT_MS
  export STRATA_NCCL_TIMEOUT_MS=2000
  nodes stream cuda:0 cuda:1
  ref=$(gen "$SM" --peers "$PEERS" --stages 2 --prompt-ids 1,2,3,4 --max-tokens 48 --no-eos --xport nccl 2>"$OUT/lost-ref.err" | grep '^ids')
  export STRATA_TEST_NCCL_SKIP_RECV=20
  nodes stream cuda:0 cuda:1
  unset STRATA_TEST_NCCL_SKIP_RECV
  export STRATA_NCCL_TIMEOUT_MS=$saved_to
  t0=$(date +%s)
  out=$(GEN_TIMEOUT=90 gen "$SM" --peers "$PEERS" --stages 2 --prompt-ids 1,2,3,4 --max-tokens 48 --no-eos --xport nccl 2>"$OUT/lost.err" | grep '^ids')
  echo "lost step: $(grep -o -m1 'link [a-z]*' "$OUT/lost-ref.err") ids $( [ -n "$ref" ] && [ "$out" = "$ref" ] && echo equal || echo DIFFER) in $(( $(date +%s) - t0 )) s, $(grep -o 'recoveries [0-9]*' "$OUT/lost.err")" | tee -a "$SUM"
  grep -h -E "SKIP_RECV|dropped the link|waited more than|NCCL link to stage|stream did not finish" "$OUT"/node-stream-*.log | sed 's/^/  /' | tee -a "$SUM"
  for g in 0 1; do
    nodes stream cuda:$g
    r=$(gen "$SM" --peers "$PEERS" --stages 1 --prompt-ids 1,2,3,4 --max-tokens 8 --no-eos 2>/dev/null | grep -c '^ids')
    echo "GPU $g after the lost step: $( [ "$r" = 1 ] && echo usable || echo 'NOT USABLE')" | tee -a "$SUM"
  done
fi
if [[ $PHASES == *5* ]] && [ "$GPUS" -ge 2 ]; then
  echo "== 5. bench --peers, stable context ${FULLCTX:-196608}" | tee -a "$SUM"
  for mode in $MODES; do
    [[ $mode == stream || $mode == nccl ]] || continue
    [ "$(left)" -gt 120 ] || { echo "skipped bench $mode: time" | tee -a "$SUM"; continue; }
    unset STRATA_NCCL_GRAPH
    nodes stream cuda:0 cuda:1
    timeout $(( $(left) - 10 )) "$S" bench "$BENCH_MODEL" --peers "$PEERS" --prompt 256 --gen 64 --concurrency "${CONC:-32}" \
      --context "${FULLCTX:-196608}" $(xport_of $mode) --out "$OUT/bench-peers-$mode" > "$OUT/bench-peers-$mode.md" 2> "$OUT/bench-peers-$mode.err"
    echo "bench --peers ($mode, rc $?):" | tee -a "$SUM"
    grep -E "^\| (stage|hop|orchestration|predicted|aggregate|\*\*)" "$OUT/bench-peers-$mode.md" | tee -a "$SUM"
  done
fi
cleanup
echo "== summary (total $(( $(date +%s) - T_START )) s)"
cat "$SUM"
