#!/usr/bin/env bash
# make demo: the main job on the embedded default. Synthesises a qwen3-0.6b-shaped checkpoint
# (MLX 4-bit, RANDOM weights, the real Qwen3 tokenizer) into the cache once, starts a local
# 3-node pipeline (three `strata node` processes on 127.0.0.1), streams an answer to a prompt
# through it, and prints the benchmark table of the cluster and of a single node.
set -euo pipefail
bin="${1:-build/strata}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${STRATA_CACHE:-$root/.cache}"
model="$cache/models/qwen3-0.6b-q4g64"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

"$root/tools/fetch-test-assets.sh" "$cache"
if [ ! -f "$model/config.json" ]; then
    echo "strata demo: synthesising the default model (qwen3-0.6b shape, MLX 4-bit, random weights) into $model"
    STRATA_CACHE="$cache" "$bin" synth --preset qwen3-0.6b --quant q4g64 "$model"
fi

export STRATA_CLUSTER_KEY="demo-$(od -An -N8 -tx8 /dev/urandom | tr -d ' ')"
for i in 0 1 2; do
    "$bin" node --listen 127.0.0.1:0 --port-file "$work/port$i" --state-dir "$work/node$i" --threads 1 \
        > "$work/node$i.log" 2>&1 &
    pids+=($!)
done
for _ in $(seq 100); do
    [ -s "$work/port0" ] && [ -s "$work/port1" ] && [ -s "$work/port2" ] && break
    sleep 0.2
done
peers="127.0.0.1:$(cat "$work/port0"),127.0.0.1:$(cat "$work/port1"),127.0.0.1:$(cat "$work/port2")"

cat <<'MSG'

======================================================================================
 strata demo — the default model has the shape of Qwen3-0.6B but RANDOM weights:
 the text below is gibberish by construction. It runs as a 3-stage pipeline of three
 local `strata node` processes. To run a real model:
     build/strata run path/to/checkpoint "your prompt"     (or a hub id org/name)
======================================================================================

MSG
"$bin" run "$model" "Explain pipeline parallelism in one paragraph." --peers "$peers" \
    --max-tokens 48 --temperature 0.8 --seed 7
echo
echo "strata demo: benchmark of the 3-node pipeline (the seed report's table) ..."
mkdir -p "$cache/demo-report/cluster" "$cache/demo-report/single"
"$bin" bench "$model" --peers "$peers" --prompt 64 --gen 32 --out "$cache/demo-report/cluster"
echo
echo "strata demo: the same model on one node ..."
"$bin" bench "$model" --prompt 128 --gen 32 --context 8192 --out "$cache/demo-report/single"
