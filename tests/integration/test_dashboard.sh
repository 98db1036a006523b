#!/usr/bin/env bash
# test_dashboard.sh — the `strata serve` dashboard in headless Chromium (playwright-core from npm,
# Debian's chromium): load the page, send a chat message, see the tokens stream, take a
# screenshot into the build directory (serve-dashboard.png next to the strata binary).
#
#   bash tests/integration/test_dashboard.sh STRATA_BIN REPO_ROOT
#
# Set-up: installs chromium with apt-get when missing (skips, saying so, only if that fails)
# and playwright-core into $STRATA_CACHE/npm-serve. The model is test_serve.sh's tiny Qwen3.
set -u
BIN=$(readlink -f "$1")
ROOT=$(readlink -f "$2")
CACHE=${STRATA_CACHE:-$ROOT/.cache}
WORK=$(mktemp -d /tmp/strata-dash-test.XXXXXX)
SPID=
cleanup() {
    [ -n "$SPID" ] && kill "$SPID" 2>/dev/null && sleep 0.3 && kill -9 "$SPID" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT
skip() { echo "SKIP: $*"; exit 0; }

TOKDIR=$CACHE/tokenizers/qwen3
[ -f "$TOKDIR/tokenizer.json" ] || skip "no Qwen3 tokenizer in $TOKDIR (run tools/fetch-test-assets.sh)"
command -v node >/dev/null || skip "node is missing"
CHROMIUM=$(command -v chromium || true)
if [ -z "$CHROMIUM" ]; then
    echo "chromium is missing: apt-get install chromium"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        timeout 600 apt-get install -y chromium >"$WORK/apt.log" 2>&1 ||
            { apt-get update >/dev/null 2>&1 && timeout 600 apt-get install -y chromium >"$WORK/apt.log" 2>&1; }
    fi
    CHROMIUM=$(command -v chromium || true)
    [ -n "$CHROMIUM" ] || skip "chromium is not installed and apt-get could not install it ($(tail -1 "$WORK/apt.log" 2>/dev/null))"
fi
NPM_DIR=$CACHE/npm-serve
if [ ! -d "$NPM_DIR/node_modules/playwright-core" ]; then
    mkdir -p "$NPM_DIR" && (cd "$NPM_DIR" && { [ -f package.json ] || npm init -y >/dev/null; } &&
        npm install --no-audit --no-fund playwright-core >/dev/null 2>&1)
    [ -d "$NPM_DIR/node_modules/playwright-core" ] || { echo "FAIL - npm install playwright-core failed"; exit 1; }
fi
MODEL=$CACHE/models/serve-tiny-qwen3
if [ ! -f "$MODEL/model.safetensors" ]; then
    mkdir -p "$CACHE/models"
    node "$ROOT/tests/integration/serve_client.mjs" model "$MODEL.tmp" "$TOKDIR" >/dev/null &&
        rm -rf "$MODEL" && mv "$MODEL.tmp" "$MODEL" || { echo "FAIL - cannot write the test model"; exit 1; }
fi

"$BIN" serve "$MODEL" --port 0 --port-file "$WORK/port" --slots 2 --ctx 1024 >"$WORK/serve.log" 2>&1 &
SPID=$!
for _ in $(seq 1 200); do
    [ -s "$WORK/port" ] && [ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$(cat "$WORK/port")/health")" = 200 ] && break
    sleep 0.1
done
URL=http://127.0.0.1:$(cat "$WORK/port")
SHOT=$(dirname "$BIN")/serve-dashboard.png
timeout 180 node "$ROOT/tests/integration/test_dashboard.mjs" "$URL" "$NPM_DIR" "$SHOT" "$CHROMIUM"
RC=$?
[ $RC = 0 ] && echo "dashboard test passed; screenshot: $SHOT" || { echo "FAIL - dashboard test (rc $RC)"; tail -5 "$WORK/serve.log"; }
exit $RC
