#!/usr/bin/env bash
# cluster_figures.sh — the issue #5 figures on a 3-stage loopback cluster of CPU nodes:
# per-token orchestration overhead, per-hop latency over shm and tcp (with and without
# --data-mac), aggregate tokens/s with 1, 4 and 16 concurrent sequences.
#
# usage: bash tests/integration/cluster_figures.sh STRATA_BINARY MODEL_DIR [MAX_TOKENS] [THREADS]
# (not run by ctest: it measures, it does not check). Nodes are killed on exit.
set -u
bin=${1:?usage: cluster_figures.sh STRATA_BINARY MODEL_DIR [MAX_TOKENS] [THREADS]}
model=${2:?usage: cluster_figures.sh STRATA_BINARY MODEL_DIR [MAX_TOKENS] [THREADS]}
ntok=${3:-128}
threads=${4:-1}
export STRATA_CLUSTER_KEY="figures-$$"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/strata-figures-XXXXXX") || exit 1
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$tmp"' EXIT
peers=""
for i in 0 1 2; do
    "$bin" node --listen 127.0.0.1:0 --port-file "$tmp/p$i" --threads "$threads" --no-bw-probe 2>"$tmp/n$i.log" &
    pids+=($!)
done
for i in 0 1 2; do
    for _ in $(seq 100); do [ -s "$tmp/p$i" ] && break; sleep 0.05; done
    peers="$peers${peers:+,}127.0.0.1:$(cat "$tmp/p$i")"
done
run() { # LABEL ARGS...
    local label=$1
    shift
    timeout 300 "$bin" cluster-gen "$model" --peers "$peers" --stages 3 --prompt-ids 1,2,3,4,5,6,7,8 --max-tokens "$ntok" \
        --no-eos --threads "$threads" "$@" 2>&1 >/dev/null | grep '^stats:' | sed "s/^stats:/$label:/"
}
echo "model $model, 3 stages, $ntok tokens per sequence, $threads thread(s) per node, $(nproc) cores"
for x in shm tcp; do
    run "$x" --xport $x
    run "$x+mac" --xport $x --data-mac | head -1
done
for s in 1 4 16; do
    for x in shm tcp; do run "$x seqs=$s" --xport $x --seqs $s --slots $s | head -1; done
done
