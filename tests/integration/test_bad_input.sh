#!/usr/bin/env bash
# test_bad_input.sh — the CLI on corrupted checkpoints: `strata inspect` and `strata eval-golden`
# must fail cleanly on each broken copy of a fixture model; `strata comm-bench` on bad arguments
# and without a GPU.
#
# usage: bash tests/integration/test_bad_input.sh STRATA_BINARY REPO_ROOT
#
# For every case and command: non-zero exit status below 128 (no signal, no abort), exactly one
# "strata: " line on stderr, that line names the broken file and the problem, and no sanitizer
# report (the script is also run by the ASan+UBSan build).
set -u

bin=${1:?usage: test_bad_input.sh STRATA_BINARY REPO_ROOT}
root=${2:?usage: test_bad_input.sh STRATA_BINARY REPO_ROOT}
fx=${STRATA_FIXTURES:-$root/tests/fixtures}
src=$fx/models/qwen3-bf16
sharded=$fx/models/qwen3_moe-bf16-sharded
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1}

tmp=$(mktemp -d "${TMPDIR:-/tmp}/strata-badinput-XXXXXX") || exit 1
trap 'rm -rf "$tmp"' EXIT
failures=0
checks=0

# shellcheck source=cli_lib.sh
. "$(dirname "$0")/cli_lib.sh"

# fresh NAME [FIXTURE]: a copy of the fixture (default qwen3-bf16) in $tmp/NAME; prints its path.
fresh() {
    local d=$tmp/$1
    rm -rf "$d"
    cp -r "${2:-$src}" "$d"
    echo "$d"
}

# expect CASE FILE PROBLEM CMD...: run CMD, check exit status, the single error line and sanitizers.
expect() {
    local name=$1 file=$2 problem=$3
    shift 3
    local out=$tmp/out.txt err=$tmp/err.txt rc
    "$@" >"$out" 2>"$err"
    rc=$?
    checks=$((checks + 1))
    local what="$name ($2)"
    if [ "$rc" -eq 0 ]; then
        fail "$what: exit status 0 on bad input"
    elif [ "$rc" -ge 128 ]; then
        fail "$what: killed by a signal or aborted (exit status $rc)"
    fi
    if grep -qE 'AddressSanitizer|LeakSanitizer|UndefinedBehaviorSanitizer|runtime error:' "$err"; then
        fail "$what: sanitizer report"
        sed 's/^/    /' "$err" | head -40 >&2
    fi
    local n
    n=$(grep -c '^strata: ' "$err")
    if [ "$n" -ne 1 ]; then
        fail "$what: $n 'strata: ' lines on stderr, want exactly 1"
        sed 's/^/    /' "$err" | head -20 >&2
    fi
    local line
    line=$(grep -m1 '^strata: ' "$err")
    case "$line" in
    *"$file"*) ;;
    *) fail "$what: error line does not name $file: $line" ;;
    esac
    case "$line" in
    *"$problem"*) ;;
    *) fail "$what: error line does not say '$problem': $line" ;;
    esac
}

# both CASE FILE PROBLEM DIR: `inspect` and `eval-golden` on DIR.
both() {
    expect "$1" "$2" "$3" "$bin" inspect "$4"
    expect "$1" "$2" "$3" "$bin" eval-golden "$4"
}

[ -x "$bin" ] || { echo "no strata binary at $bin" >&2; exit 1; }
[ -d "$src" ] || { echo "no fixture at $src" >&2; exit 1; }

# 1. model.safetensors cut in half: the last tensors end past EOF
d=$(fresh truncated)
truncate -s 500000 "$d/model.safetensors"
both truncated "$d/model.safetensors" "truncated file" "$d"

# 2. model.safetensors shorter than its 8-byte length prefix
d=$(fresh tiny)
truncate -s 5 "$d/model.safetensors"
both tiny "$d/model.safetensors" "too short" "$d"

# 3. empty model.safetensors
d=$(fresh empty)
: >"$d/model.safetensors"
both empty "$d/model.safetensors" "too short" "$d"

# 4. header length field overwritten with 0xff bytes
d=$(fresh hdrlen)
printf '\xff\xff\xff\xff\xff\xff\xff\x7f' | dd of="$d/model.safetensors" bs=1 count=8 conv=notrunc status=none
both hdrlen "$d/model.safetensors" "exceeds the 100000000-byte limit" "$d"

# 5. a header byte that is not UTF-8 (first key's opening quote is at offset 9)
d=$(fresh utf8)
printf '\xc3' | dd of="$d/model.safetensors" bs=1 seek=10 count=1 conv=notrunc status=none
both utf8 "$d/model.safetensors" "not valid UTF-8" "$d"

# 6. garbage config.json: binary noise with bytes that are not UTF-8
d=$(fresh garbage-config)
printf '\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe{{{' >"$d/config.json"
both garbage-config "$d/config.json" "invalid" "$d"

# 7. config.json cut mid-object: line/column reported
d=$(fresh cut-config)
head -c 100 "$src/config.json" >"$d/config.json"
both cut-config "$d/config.json" "invalid JSON at line" "$d"

# 8. config.json of an architecture strata does not implement
d=$(fresh unsupported)
sed 's/"model_type": "qwen3"/"model_type": "gpt_neox"/' "$src/config.json" >"$d/config.json"
both unsupported "$d/config.json" 'unsupported model_type "gpt_neox"' "$d"

# 9. config.json missing
d=$(fresh no-config)
rm "$d/config.json"
both no-config "$d/config.json" "cannot open" "$d"

# 10. a required field removed
d=$(fresh no-layers)
grep -v '"num_hidden_layers"' "$src/config.json" >"$d/config.json"
both no-layers "$d/config.json" 'missing required field "num_hidden_layers"' "$d"

# 11. sharded checkpoint whose index names a shard that is not there
d=$(fresh missing-shard "$sharded")
rm "$d/model-00002-of-00002.safetensors"
both missing-shard "$d/model-00002-of-00002.safetensors" "cannot open" "$d"

# 12. a weight stored as a byte-compatible but wrong shape ([256,128] -> [128,256]), edited in
#     place in the header text (same length, so offsets stay valid)
d=$(fresh reshaped)
from='"model.layers.0.mlp.up_proj.weight":{"dtype":"BF16","shape":[256,128]'
to='"model.layers.0.mlp.up_proj.weight":{"dtype":"BF16","shape":[128,256]'
off=$(head -c 8192 "$d/model.safetensors" | grep -abo -F "$from" | head -1 | cut -d: -f1)
if [ -n "$off" ]; then
    printf '%s' "$to" | dd of="$d/model.safetensors" bs=1 seek="$off" conv=notrunc status=none
    both reshaped "$d/model.safetensors" "'model.layers.0.mlp.up_proj.weight' has shape" "$d"
else
    fail "reshaped: fixture header does not contain $from"
fi

# 13. eval-golden only: a corrupt golden.safetensors is named as such
d=$(fresh bad-golden)
truncate -s 1000 "$d/golden.safetensors"
expect bad-golden "$d/golden.safetensors" "truncated file" "$bin" eval-golden "$d"

# 14. a directory that does not exist
expect no-dir "$tmp/does-not-exist/config.json" "cannot open" "$bin" inspect "$tmp/does-not-exist"

# 15. strata comm-bench: argument errors and a machine without a GPU give exit status 2 and one
#     "strata: " line (and nothing else) on stderr
expect_usage comm-bench-size 'not a message size' "$bin" comm-bench --sizes 6K,12X
expect_usage comm-bench-odd-size 'not a message size' "$bin" comm-bench --sizes 6
expect_usage comm-bench-zero-size 'not a message size' "$bin" comm-bench --sizes 0K
expect_usage comm-bench-empty-sizes 'empty list' "$bin" comm-bench --sizes ,
expect_usage comm-bench-gpus 'not a GPU count' "$bin" comm-bench --gpus 0
expect_usage comm-bench-iters 'not a count' "$bin" comm-bench --iters 1x
expect_usage comm-bench-option 'unknown or incomplete option' "$bin" comm-bench --bogus
expect_usage comm-bench-missing 'unknown or incomplete option' "$bin" comm-bench --gpus
if ! nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    expect_usage comm-bench-no-gpu 'no CUDA device' "$bin" comm-bench
    expect_usage comm-bench-no-gpu-args 'no CUDA device' "$bin" comm-bench --gpus 2 --sizes 12K --iters 10
fi
"$bin" comm-bench --help >"$tmp/out.txt" 2>&1 || fail "comm-bench --help: non-zero exit status"
grep -q 'usage: strata comm-bench' "$tmp/out.txt" || fail "comm-bench --help: no usage line"
checks=$((checks + 1))

if [ "$failures" -ne 0 ]; then
    echo "test_bad_input: $failures of $checks checks failed" >&2
    exit 1
fi
echo "test_bad_input: $checks checks passed"
