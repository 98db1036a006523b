# cli_lib.sh — checks shared by the command-line integration tests (sourced, not run). The
# sourcing script sets $tmp (a scratch directory) and the counters failures=0, checks=0.

fail() {
    echo "FAIL: $*" >&2
    failures=$((failures + 1))
}

# expect_usage NAME PROBLEM CMD...: CMD exits with status 2 and writes exactly one line to
# stderr, "strata: ...PROBLEM" (the contract for bad arguments and unusable machines).
expect_usage() {
    local name=$1 problem=$2
    shift 2
    local err=$tmp/err.txt rc n
    "$@" >/dev/null 2>"$err"
    rc=$?
    checks=$((checks + 1))
    [ "$rc" -eq 2 ] || fail "$name: exit status $rc, want 2"
    n=$(wc -l <"$err")
    [ "$n" -eq 1 ] || { fail "$name: $n lines on stderr, want 1"; sed 's/^/    /' "$err" | head -20 >&2; }
    grep -q "^strata: .*$problem" "$err" || fail "$name: stderr does not say '$problem': $(head -c 300 "$err")"
}
