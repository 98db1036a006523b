#!/usr/bin/env bash
# test_bench_cli.sh — `strata bench` arguments: bad --concurrency values are refused with exit
# status 2 and one "strata: " line naming the flag; the CPU path's --concurrency N still decodes
# N sequences together and reports their aggregate rate (report.md row and report.json field),
# and without it no aggregate row appears.
#
# usage: bash tests/integration/test_bench_cli.sh STRATA_BINARY REPO_ROOT
set -u

bin=${1:?usage: test_bench_cli.sh STRATA_BINARY REPO_ROOT}
root=${2:?usage: test_bench_cli.sh STRATA_BINARY REPO_ROOT}
fx=${STRATA_FIXTURES:-$root/tests/fixtures}
model=$fx/models/qwen3-bf16
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/strata-benchcli-XXXXXX") || exit 1
trap 'rm -rf "$tmp"' EXIT
failures=0
checks=0

# shellcheck source=cli_lib.sh
. "$(dirname "$0")/cli_lib.sh"

# 1. bad --concurrency values, on every path (CPU, --device cuda, --tp): refused before any work
#    (tiny models and short runs, so a value wrongly accepted fails fast instead of benchmarking)
small=(--prompt 8 --gen 6 --no-max-context --out "$tmp/bad")
for v in 0 -3 abc 4x '' 1025 99999999999; do
    expect_usage "conc '$v'" "--concurrency '$v': not a sequence count (1..1024)" \
        "$bin" bench "$model" "${small[@]}" --concurrency "$v"
    expect_usage "conc '$v' cuda" "--concurrency '$v': not a sequence count" \
        "$bin" bench --synthetic tiny-qwen3:q4g64 --device cuda "${small[@]}" --concurrency "$v"
    expect_usage "conc '$v' tp" "--concurrency '$v': not a sequence count" \
        "$bin" bench --synthetic tiny-minimax:q5g64 --device cuda --tp 2 --context 64 "${small[@]}" --concurrency "$v"
done

# 2. the CPU path: --concurrency 3 decodes three sequences together and reports the aggregate
run_bench() { # OUT_DIR ARGS...
    local out=$1
    shift
    "$bin" bench "$model" --prompt 8 --gen 6 --no-max-context --threads 2 --out "$out" "$@" >"$out.stdout" 2>"$out.stderr"
}
checks=$((checks + 1))
if run_bench "$tmp/c3" --concurrency 3; then
    grep -q '| \*\*Aggregate TPS\*\* | \*\*[0-9.]* TPS\*\* | 3 sequences decoding together |' "$tmp/c3/report.md" ||
        fail "cpu --concurrency 3: no aggregate row in report.md: $(grep -i aggregate "$tmp/c3/report.md")"
    grep -q '"concurrency": 3,' "$tmp/c3/report.json" || fail "cpu --concurrency 3: report.json concurrency"
    agg=$(sed -n 's/.*"aggregate_tok_s": \([0-9.e+-]*\).*/\1/p' "$tmp/c3/report.json")
    awk -v a="${agg:-0}" 'BEGIN { exit !(a > 0) }' || fail "cpu --concurrency 3: aggregate_tok_s '$agg' not > 0"
    grep -q 'agg_step_p50_ms' "$tmp/c3/report.json" && fail "cpu --concurrency 3: CUDA-only field in report.json"
else
    fail "cpu --concurrency 3: exit status $?: $(tail -c 400 "$tmp/c3.stderr")"
fi
checks=$((checks + 1))
if run_bench "$tmp/c1"; then
    grep -q 'Aggregate TPS' "$tmp/c1/report.md" && fail "cpu without --concurrency: an aggregate row"
    grep -q '"concurrency": 1,' "$tmp/c1/report.json" || fail "cpu without --concurrency: report.json concurrency"
else
    fail "cpu without --concurrency: exit status $?: $(tail -c 400 "$tmp/c1.stderr")"
fi

if [ "$failures" -ne 0 ]; then
    echo "test_bench_cli: $failures of $checks checks failed" >&2
    exit 1
fi
echo "test_bench_cli: $checks checks passed"
