#!/usr/bin/env bash
# make demo: the main job on the embedded default. Synthesises a qwen3-0.6b-shaped checkpoint
# (MLX 4-bit, RANDOM weights, the real Qwen3 tokenizer) into the cache once, streams an answer
# to a prompt, and prints the benchmark table.
set -euo pipefail
bin="${1:-build/strata}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${STRATA_CACHE:-$root/.cache}"
model="$cache/models/qwen3-0.6b-q4g64"

"$root/tools/fetch-test-assets.sh" "$cache"
if [ ! -f "$model/config.json" ]; then
    echo "strata demo: synthesising the default model (qwen3-0.6b shape, MLX 4-bit, random weights) into $model"
    STRATA_CACHE="$cache" "$bin" synth --preset qwen3-0.6b --quant q4g64 "$model"
fi

cat <<'MSG'

======================================================================================
 strata demo — the default model has the shape of Qwen3-0.6B but RANDOM weights:
 the text below is gibberish by construction. To run a real model:
     build/strata run path/to/checkpoint "your prompt"     (or a hub id org/name)
======================================================================================

MSG
"$bin" run "$model" "Explain pipeline parallelism in one paragraph." --max-tokens 48 --temperature 0.8 --seed 7
echo
echo "strata demo: benchmark (the seed report's table) ..."
mkdir -p "$cache/demo-report"
"$bin" bench "$model" --prompt 128 --gen 32 --out "$cache/demo-report"
