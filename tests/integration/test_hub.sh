#!/usr/bin/env bash
# test_hub.sh — `strata pull` against tools/hubserver.py, a local stand-in for the Hugging Face
# hub on 127.0.0.1 (random free port): cache layout, byte-identical files, only the needed
# files, offline mode, interrupted transfers (resumed in one run and across runs, also against
# a server that ignores Range), corrupted files, tokens, 404s, and that the snapshot loads
# (`strata eval-golden`).
#
# usage: bash tests/integration/test_hub.sh STRATA_BINARY REPO_ROOT
# Every server stops itself after 120 s and is killed on exit; every command has a timeout.
set -uo pipefail

STRATA=${1:?usage: test_hub.sh STRATA_BINARY REPO_ROOT}
ROOT=${2:?usage: test_hub.sh STRATA_BINARY REPO_ROOT}
SERVER="$ROOT/tools/hubserver.py"
FIX="$ROOT/tests/fixtures/models"
QWEN="$FIX/qwen3-bf16"
MOE="$FIX/qwen3_moe-bf16-sharded"
command -v python3 >/dev/null || { echo "FAIL: python3 is needed to run tools/hubserver.py"; exit 1; }
command -v timeout >/dev/null || { echo "FAIL: coreutils timeout is needed"; exit 1; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/strata-hub.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# loopback only, whatever proxies the environment names; no token or offline switch leaks in
export no_proxy=127.0.0.1,localhost NO_PROXY=127.0.0.1,localhost
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY all_proxy HF_TOKEN HUGGING_FACE_HUB_TOKEN \
      HF_HUB_OFFLINE HF_HUB_CACHE HUGGINGFACE_HUB_CACHE HF_TOKEN_PATH XDG_CACHE_HOME
export STRATA_LOG=info

PASSED=0
FAILED=0
ok() { PASSED=$((PASSED + 1)); echo "ok   $*"; }
fail() { FAILED=$((FAILED + 1)); echo "FAIL $*"; }
check() { local what=$1; shift; if "$@"; then ok "$what"; else fail "$what"; fi; }

# start_server NAME ARGS... : starts a hub server; sets PORT and LOG. Waits <= 10 s for it.
start_server() {
    local name=$1; shift
    LOG="$TMP/$name.log"
    : >"$LOG"
    python3 "$SERVER" --port-file "$TMP/$name.port" --log "$LOG" --lifetime 120 "$@" 2>"$TMP/$name.err" &
    PIDS+=($!)
    SERVER_PID=$!
    for _ in $(seq 100); do
        [ -s "$TMP/$name.port" ] && break
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    if [ ! -s "$TMP/$name.port" ]; then
        echo "FAIL: hub server '$name' did not start:"; cat "$TMP/$name.err"; exit 1
    fi
    PORT=$(cat "$TMP/$name.port")
}
stop_server() { kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; }

# pull HF_HOME ARGS... : runs strata pull with a 120 s limit; sets RC, OUT (stdout), ERR (stderr file)
pull() {
    local home=$1; shift
    ERR="$TMP/pull.err"
    OUT=$(HF_HOME="$home" HF_ENDPOINT="http://127.0.0.1:$PORT" timeout 120 "$STRATA" pull "$@" 2>"$ERR")
    RC=$?
    cat "$ERR" >&2
}
has_err() { grep -q -- "$1" "$ERR"; }

# same_files SNAPSHOT FIXTURE_DIR NAMES... : every name is byte-identical to the fixture
same_files() {
    local snap=$1 src=$2; shift 2
    for f in "$@"; do cmp -s "$snap/$f" "$src/$f" || { echo "  $snap/$f differs from $src/$f"; return 1; }; done
}
git_blob_sha1() {
    python3 -c 'import hashlib, sys; d = open(sys.argv[1], "rb").read(); print(hashlib.sha1(b"blob %d\0" % len(d) + d).hexdigest())' "$1"
}
no_incomplete() { ! compgen -G "$1/blobs/*.incomplete" >/dev/null; }

# ---------------------------------------------------------------------------------------------
echo "== plain pull"
H1="$TMP/hf1"
start_server plain --repo test/qwen3-bf16="$QWEN" --repo test/moe-sharded="$MOE"
pull "$H1" test/qwen3-bf16 --include 'golden.*'
REPO="$H1/hub/models--test--qwen3-bf16"
SNAP=$OUT
check "pull exits 0" [ "$RC" = 0 ]
check "prints the snapshot path" bash -c "[[ '$SNAP' =~ ^$REPO/snapshots/[0-9a-f]{40}\$ ]]"
COMMIT=$(basename "$SNAP")
check "refs/main names the commit" [ "$(cat "$REPO/refs/main" 2>/dev/null)" = "$COMMIT" ]
check "files byte-identical" same_files "$SNAP" "$QWEN" config.json model.safetensors golden.json golden.safetensors
check "snapshot entries are symlinks into blobs/" bash -c \
    "[ -L '$SNAP/model.safetensors' ] && [[ \$(readlink '$SNAP/model.safetensors') == ../../blobs/* ]]"
check "LFS blob named by sha256" [ -f "$REPO/blobs/$(sha256sum "$QWEN/model.safetensors" | cut -c1-64)" ]
check "regular blob named by git blob sha1" [ -f "$REPO/blobs/$(git_blob_sha1 "$QWEN/config.json")" ]
check "only needed files (no README.md / pytorch_model.bin / .gitattributes)" bash -c \
    "[ ! -e '$SNAP/README.md' ] && [ ! -e '$SNAP/pytorch_model.bin' ] && [ ! -e '$SNAP/.gitattributes' ]"
check "no .incomplete left" no_incomplete "$REPO"
N_GET=$(grep -c '^GET ' "$LOG")
pull "$H1" test/qwen3-bf16 --include 'golden.*'
check "second pull: same path" [ "$OUT" = "$SNAP" ]
check "second pull downloads nothing (one API call)" [ "$(grep -c '^GET ' "$LOG")" = $((N_GET + 1)) ]

pull "$H1" test/moe-sharded@main --include 'golden.*'
MSNAP=$OUT
check "sharded pull exits 0" [ "$RC" = 0 ]
check "index + both shards byte-identical" same_files "$MSNAP" "$MOE" config.json model.safetensors.index.json \
    model-00001-of-00002.safetensors model-00002-of-00002.safetensors golden.safetensors
pull "$H1" "test/moe-sharded@$(basename "$MSNAP")"
check "pull by commit sha" test "$RC" = 0 -a "$OUT" = "$MSNAP"

pull "$H1" test/qwen3-bf16@no-such-branch
check "unknown revision fails" [ "$RC" = 1 ]
check "  ... with 'no such model or revision'" has_err "no such model or revision"
pull "$H1" test/no-such-model
check "unknown model fails with 'no such model or revision'" has_err "no such model or revision"
pull "$H1" not-a-hub-id
check "neither directory nor hub id: usage error message" bash -c "[ $RC != 0 ] && grep -q 'not a hub id' '$ERR'"
pull "$H1" "$QWEN"
check "a local directory is returned as is" [ "$OUT" = "$QWEN" ]
stop_server

# ---------------------------------------------------------------------------------------------
echo "== offline (server stopped)"
pull "$H1" test/qwen3-bf16 --offline
check "--offline resolves from the cache" test "$RC" = 0 -a "$OUT" = "$SNAP"
OUT=$(HF_HOME="$H1" HF_HUB_OFFLINE=1 HF_ENDPOINT="http://127.0.0.1:$PORT" timeout 60 "$STRATA" pull test/qwen3-bf16 2>/dev/null)
check "HF_HUB_OFFLINE=1 resolves from the cache" [ "$OUT" = "$SNAP" ]
pull "$H1" test/other-model --offline
check "--offline, not cached: fails" [ "$RC" = 1 ]
check "  ... saying it is not in the cache" has_err "offline.*not in the hub cache"
pull "$H1" test/qwen3-bf16
check "online, hub unreachable, cached: falls back" test "$RC" = 0 -a "$OUT" = "$SNAP"
check "  ... with a warning" has_err "using the cached snapshot"
pull "$H1" test/other-model
check "online, hub unreachable, not cached: fails" [ "$RC" = 1 ]
check "  ... naming the URL" has_err "http://127.0.0.1:$PORT/api/models/test/other-model/revision/main"

echo "== the snapshot loads"
timeout 300 "$STRATA" eval-golden "$SNAP" >"$TMP/golden.out" 2>&1
check "eval-golden on the qwen3 snapshot passes" grep -q "golden: 4 passed, 0 failed" "$TMP/golden.out"
timeout 300 "$STRATA" eval-golden "$MSNAP" >"$TMP/golden.out" 2>&1
check "eval-golden on the sharded snapshot passes" grep -q "passed, 0 failed" "$TMP/golden.out"

# ---------------------------------------------------------------------------------------------
echo "== interrupted transfer, resumed in the same run"
H2="$TMP/hf2"
start_server cut --repo test/qwen3-bf16="$QWEN" --cut model.safetensors=300000
pull "$H2" test/qwen3-bf16
check "pull succeeds" [ "$RC" = 0 ]
check "the server cut the transfer" grep -q "cut after 300000 bytes" "$LOG"
check "the client resumed with Range: bytes=300000-" grep -q "range=bytes=300000- .*-> 206" "$LOG"
check "resumed file byte-identical" same_files "$OUT" "$QWEN" model.safetensors config.json
check "no .incomplete left" no_incomplete "$H2/hub/models--test--qwen3-bf16"
stop_server

echo "== interrupted transfer, resumed by the next run"
H3="$TMP/hf3"
start_server cut2 --repo test/qwen3-bf16="$QWEN" --cut model.safetensors=400000
pull "$H3" test/qwen3-bf16 --retries 0
check "pull with --retries 0 fails on the cut" [ "$RC" = 1 ]
check "  ... saying to run again" has_err "run again to resume"
INC="$H3/hub/models--test--qwen3-bf16/blobs/$(sha256sum "$QWEN/model.safetensors" | cut -c1-64).incomplete"
check "  ... keeping 400000 bytes in blobs/<sha256>.incomplete" [ "$(stat -c %s "$INC" 2>/dev/null)" = 400000 ]
pull "$H3" test/qwen3-bf16
check "the next pull succeeds" [ "$RC" = 0 ]
check "  ... resuming at byte 400000" grep -q "range=bytes=400000- .*-> 206" "$LOG"
check "  ... file byte-identical" same_files "$OUT" "$QWEN" model.safetensors
stop_server

echo "== interrupted transfer, server without Range support"
H4="$TMP/hf4"
start_server norange --repo test/qwen3-bf16="$QWEN" --cut model.safetensors=250000 --no-range
pull "$H4" test/qwen3-bf16
check "pull succeeds (restarts from byte 0)" [ "$RC" = 0 ]
check "  ... file byte-identical" same_files "$OUT" "$QWEN" model.safetensors
stop_server

# ---------------------------------------------------------------------------------------------
echo "== corrupted files"
H5="$TMP/hf5"
start_server corrupt --repo test/qwen3-bf16="$QWEN" --corrupt model.safetensors
pull "$H5" test/qwen3-bf16
R5="$H5/hub/models--test--qwen3-bf16"
check "corrupted LFS file: pull fails" [ "$RC" = 1 ]
check "  ... with a sha256 mismatch naming the file" has_err "model.safetensors: sha256 mismatch"
check "  ... no model.safetensors in snapshots" bash -c "! compgen -G '$R5/snapshots/*/model.safetensors' >/dev/null"
check "  ... no blob or .incomplete left" bash -c \
    "[ ! -e '$R5/blobs/$(sha256sum "$QWEN/model.safetensors" | cut -c1-64)' ] && ! compgen -G '$R5/blobs/*.incomplete' >/dev/null"
stop_server
H6="$TMP/hf6"
start_server corrupt2 --repo test/qwen3-bf16="$QWEN" --corrupt config.json
pull "$H6" test/qwen3-bf16
check "corrupted regular file: git blob sha1 mismatch naming it" bash -c "[ $RC = 1 ] && grep -q 'config.json: git blob sha1 mismatch' '$ERR'"
stop_server

# ---------------------------------------------------------------------------------------------
echo "== token"
H7="$TMP/hf7"
start_server token --repo test/qwen3-bf16="$QWEN" --token s3cret
pull "$H7" test/qwen3-bf16
check "no HF_TOKEN: fails" [ "$RC" = 1 ]
check "  ... saying 'set HF_TOKEN' (401)" bash -c "grep -q 'HTTP 401' '$ERR' && grep -q 'set HF_TOKEN' '$ERR'"
HF_TOKEN=wrong pull "$H7" test/qwen3-bf16
check "wrong HF_TOKEN: fails with 403 mentioning HF_TOKEN" bash -c "[ $RC = 1 ] && grep -q 'HTTP 403.*HF_TOKEN' '$ERR'"
HF_TOKEN=s3cret pull "$H7" test/qwen3-bf16
check "HF_TOKEN=s3cret: succeeds" [ "$RC" = 0 ]
check "  ... files byte-identical" same_files "$OUT" "$QWEN" config.json model.safetensors
mkdir -p "$TMP/hf8" && printf 's3cret\n' >"$TMP/hf8/token"
pull "$TMP/hf8" test/qwen3-bf16
check "token read from \$HF_HOME/token" [ "$RC" = 0 ]
stop_server

echo "hub: $PASSED passed, $FAILED failed"
[ "$FAILED" = 0 ]
