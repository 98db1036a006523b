#!/usr/bin/env bash
# test_serve.sh — `strata serve` end to end on 127.0.0.1: every error code with curl, the
# official `openai` npm client, client-disconnect cancellation, metrics, and a load test
# (64 concurrent streaming clients; 10 s here, --load-seconds 60 for the full run).
#
#   bash tests/integration/test_serve.sh STRATA_BIN REPO_ROOT [--load-seconds N] [--load-clients N]
#
# Model: a tiny random Qwen3 (hidden 64, 2 layers) with the real Qwen3 vocabulary, written by
# `node serve_client.mjs model` next to the real tokenizer from $STRATA_CACHE/tokenizers/qwen3
# (tools/fetch-test-assets.sh); the synth presets' tiny models have a 512-token vocabulary that
# the real tokenizer cannot drive. npm packages go to
# $STRATA_CACHE/npm-serve (outside git). Everything started here is killed on exit.
set -u
BIN=$(readlink -f "$1")
ROOT=$(readlink -f "$2")
shift 2
LOAD_SECONDS=10
LOAD_CLIENTS=64
while [ $# -gt 0 ]; do
    case "$1" in
        --load-seconds) LOAD_SECONDS=$2; shift 2 ;;
        --load-clients) LOAD_CLIENTS=$2; shift 2 ;;
        *) echo "unknown option $1"; exit 2 ;;
    esac
done
CACHE=${STRATA_CACHE:-$ROOT/.cache}
WORK=$(mktemp -d /tmp/strata-serve-test.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
    sleep 0.3
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT
PASS=0
FAIL=0
ok() { echo "ok - $*"; PASS=$((PASS + 1)); }
bad() { echo "FAIL - $*"; FAIL=$((FAIL + 1)); }
skip() { echo "SKIP: $*"; exit 0; }

TOKDIR=$CACHE/tokenizers/qwen3
[ -f "$TOKDIR/tokenizer.json" ] || skip "no Qwen3 tokenizer in $TOKDIR (run tools/fetch-test-assets.sh)"
command -v node >/dev/null || skip "node is needed (test model, openai client, load test)"
command -v python3 >/dev/null || skip "python3 is needed (JSON checks)"
command -v curl >/dev/null || skip "curl is missing"

# ---------------------------------------------------------------------------------------------
# the model
MODEL=$CACHE/models/serve-tiny-qwen3
if [ ! -f "$MODEL/model.safetensors" ] || [ ! -f "$MODEL/tokenizer.json" ]; then
    mkdir -p "$CACHE/models"
    node "$ROOT/tests/integration/serve_client.mjs" model "$MODEL.tmp" "$TOKDIR" ||
        { echo "FAIL - cannot write the test model"; exit 1; }
    rm -rf "$MODEL" && mv "$MODEL.tmp" "$MODEL"
fi
NAME=serve-tiny-qwen3

# ---------------------------------------------------------------------------------------------
# helpers

# start_server LOG ARGS... : starts strata serve on an ephemeral port, sets PORT and SPID
start_server() {
    local log=$1
    shift
    rm -f "$WORK/port"
    "$BIN" serve "$MODEL" --port 0 --port-file "$WORK/port" "$@" >"$log" 2>&1 &
    SPID=$!
    PIDS+=("$SPID")
    for _ in $(seq 1 100); do
        [ -s "$WORK/port" ] && break
        sleep 0.1
    done
    PORT=$(cat "$WORK/port" 2>/dev/null)
    [ -n "$PORT" ] || { cat "$log"; echo "FAIL - the server did not start"; exit 1; }
    URL=http://127.0.0.1:$PORT
}
wait_ready() {
    for _ in $(seq 1 200); do
        [ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/health")" = 200 ] && return 0
        sleep 0.1
    done
    echo "FAIL - the server never became ready"
    exit 1
}
# req METHOD PATH [curl args...] : sets CODE, BODY, HDRS
req() {
    local m=$1 p=$2
    shift 2
    CODE=$(curl -s -m 30 -X "$m" -D "$WORK/h" -o "$WORK/b" -w '%{http_code}' "$URL$p" "$@")
    BODY=$(cat "$WORK/b")
    HDRS=$(cat "$WORK/h")
}
# expect CODE FIELD-SUBSTRING DESCRIPTION : checks the last req's status and that the body has
# OpenAI's error shape containing the substring
expect_err() {
    local code=$1 sub=$2 what=$3
    if [ "$CODE" = "$code" ] && echo "$BODY" | grep -q '"error":{"message"' && echo "$BODY" | grep -qF -- "$sub"; then
        ok "$code $what: $(echo "$BODY" | head -c 200)"
    else
        bad "$what: expected $code with '$sub', got $CODE: $(echo "$BODY" | head -c 300)"
    fi
}
metric() { curl -s "$URL/metrics" | awk -v k="$1" '$1 == k { print $2 }'; }

KEYS=$WORK/keys
printf '# test keys\nkey-one\n\n  key-two  \n' >"$KEYS"
AUTH=(-H "Authorization: Bearer key-two")
JSON=(-H "Content-Type: application/json")

# ---------------------------------------------------------------------------------------------
echo "# server A: auth, limits, 2 slots, queue 1, context 256, load delayed 1.5 s"
STRATA_SERVE_LOAD_DELAY_MS=1500 STRATA_SERVE_FAULTS=1 start_server "$WORK/a.log" \
    --api-key-file "$KEYS" --api-key key-three --max-body 64k --slots 2 --queue 1 --ctx 256 --threads 2

req GET /health
[ "$CODE" = 503 ] && echo "$BODY" | grep -q loading && ok "503 /health while loading: $BODY" || bad "health while loading: $CODE $BODY"
req POST /v1/chat/completions "${AUTH[@]}" "${JSON[@]}" -d '{"messages":[{"role":"user","content":"hi"}]}'
expect_err 503 "loading" "chat while loading"
echo "$HDRS" | grep -qi '^Retry-After: ' && ok "503 carries Retry-After" || bad "503 without Retry-After"
wait_ready

req GET /v1/models
expect_err 401 "missing API key" "no API key"
req GET /v1/models -H "Authorization: Bearer nope"
expect_err 401 "invalid API key" "wrong API key"
req GET /v1/models "${AUTH[@]}"
[ "$CODE" = 200 ] && echo "$BODY" | grep -q "\"id\":\"$NAME\"" && ok "200 /v1/models with a key from --api-key-file" || bad "models: $CODE $BODY"
req GET /v1/models -H "Authorization: Bearer key-three"
[ "$CODE" = 200 ] && ok "200 with the --api-key key" || bad "--api-key key: $CODE"

C=/v1/chat/completions
req POST $C "${AUTH[@]}" "${JSON[@]}" -d '{"messages":[{"role":"user","content":"hi"}'
expect_err 400 "invalid JSON" "truncated JSON"
req POST $C "${AUTH[@]}" "${JSON[@]}" -d '[1,2]'
expect_err 400 "JSON object" "a JSON array body"
req POST $C "${AUTH[@]}" "${JSON[@]}" -d '{"model":"'$NAME'"}'
expect_err 400 '"param":"messages"' "missing messages"
req POST $C "${AUTH[@]}" "${JSON[@]}" -d '{"messages":[{"role":"wizard","content":"hi"}]}'
expect_err 400 '"param":"messages[0].role"' "a bad role"
req POST $C "${AUTH[@]}" "${JSON[@]}" -d '{"messages":[{"role":"user","content":"hi"}],"temperature":5}'
expect_err 400 '"param":"temperature"' "temperature out of range"
req POST $C "${AUTH[@]}" "${JSON[@]}" -d '{"messages":[{"role":"user","content":"hi"}],"max_tokens":"ten"}'
expect_err 400 '"param":"max_tokens"' "max_tokens not an integer"
req POST $C "${AUTH[@]}" "${JSON[@]}" -d '{"messages":[{"role":"user","content":"hi"}],"n":3}'
expect_err 400 '"param":"n"' "n=3"
req POST $C "${AUTH[@]}" "${JSON[@]}" -d '{"messages":[{"role":"user","content":"hi"}],"stop":[1]}'
expect_err 400 '"param":"stop"' "stop not strings"
req POST $C "${AUTH[@]}" "${JSON[@]}" -d '{"messages":[{"role":"user","content":"hi"}],"logit_bias":{"999999999":5}}'
expect_err 400 '"param":"logit_bias"' "logit_bias id out of range"
req POST $C "${AUTH[@]}" "${JSON[@]}" -d '{"messages":[{"role":"user","content":"hi"}],"top_logprobs":3}'
expect_err 400 '"param":"top_logprobs"' "top_logprobs without logprobs"
req POST $C "${AUTH[@]}" "${JSON[@]}" -d '{"model":"gpt-17","messages":[{"role":"user","content":"hi"}]}'
expect_err 404 '"code":"model_not_found"' "unknown model"
req GET /v1/nothing "${AUTH[@]}"
expect_err 404 "no route" "unknown route"
req GET /nothing
expect_err 404 "no route" "unknown route outside /v1"
req GET $C "${AUTH[@]}"
expect_err 405 "not allowed" "GET on a POST route"
head -c 100000 /dev/zero | tr '\0' 'a' >"$WORK/big"
req POST $C "${AUTH[@]}" "${JSON[@]}" --data-binary @"$WORK/big"
expect_err 413 "over the limit" "a 100 kB body over --max-body 64k"
# a prompt longer than the context (256): ~600 tokens
LONG=$(for i in $(seq 1 300); do printf 'word%d ' "$i"; done)
req POST /v1/completions "${AUTH[@]}" "${JSON[@]}" -d "{\"prompt\":\"$LONG\",\"max_tokens\":4}"
if [ "$CODE" = 400 ] && echo "$BODY" | grep -q "holds 256 tokens" && echo "$BODY" | grep -Eq "prompt has [0-9]+ tokens"; then
    ok "400 prompt longer than the context, both numbers: $(echo "$BODY" | head -c 200)"
else bad "long prompt: $CODE $BODY"; fi
# 500 with an id that is also in the log
req POST $C "${AUTH[@]}" "${JSON[@]}" -H "x-strata-fault: internal" -d '{"messages":[{"role":"user","content":"hi"}],"max_tokens":4}'
EID=$(echo "$BODY" | grep -o 'err-[0-9a-f]*' | head -1)
if [ "$CODE" = 500 ] && [ -n "$EID" ] && grep -q "$EID" "$WORK/a.log"; then
    ok "500 with error id $EID, also in the log: $(grep "$EID" "$WORK/a.log" | head -1)"
else bad "500: $CODE $BODY (log: $(tail -2 "$WORK/a.log"))"; fi
# a good request still works after all that
req POST $C "${AUTH[@]}" "${JSON[@]}" -d '{"messages":[{"role":"user","content":"hi"}],"max_tokens":4,"temperature":0}'
[ "$CODE" = 200 ] && echo "$BODY" | grep -q '"completion_tokens":4' && ok "200 chat after the errors" || bad "chat: $CODE $BODY"

# 429: 2 slots + 1 queue place; 3 long streams fill them, the 4th is refused
for i in 1 2 3; do
    curl -s -N -m 60 "$URL$C" "${AUTH[@]}" "${JSON[@]}" \
        -d '{"messages":[{"role":"user","content":"tell a long story"}],"max_tokens":200,"stream":true}' >"$WORK/long$i" &
    PIDS+=($!)
    LONGPIDS[$i]=$!
done
for _ in $(seq 1 50); do [ "$(metric strata_queue_depth)" = 1 ] && break; sleep 0.1; done
req POST $C "${AUTH[@]}" "${JSON[@]}" -d '{"messages":[{"role":"user","content":"hi"}],"max_tokens":4}'
expect_err 429 "queue is full" "a full queue"
echo "$HDRS" | grep -qi '^Retry-After: ' && ok "429 carries Retry-After" || bad "429 without Retry-After"
# client disconnect: kill the three streams; their slots and the queue place free at once
C0=$(metric strata_requests_cancelled_total)
for i in 1 2 3; do kill "${LONGPIDS[$i]}" 2>/dev/null; done
T0=$(date +%s.%N)
for _ in $(seq 1 50); do
    [ "$(metric strata_kv_slots_used)" = 0 ] && [ "$(metric strata_queue_depth)" = 0 ] && break
    sleep 0.05
done
T1=$(date +%s.%N)
C1=$(metric strata_requests_cancelled_total)
if [ "$(metric strata_kv_slots_used)" = 0 ] && [ "$((C1 - C0))" -ge 2 ]; then
    ok "client disconnects cancelled $((C1 - C0)) generations; slots free after $(echo "$T1 - $T0" | bc) s"
else bad "disconnect: slots used $(metric strata_kv_slots_used), cancelled $C0 -> $C1"; fi
# streaming format with curl
curl -s -N -m 30 "$URL$C" "${AUTH[@]}" "${JSON[@]}" \
    -d '{"messages":[{"role":"user","content":"hi"}],"max_tokens":5,"stream":true}' >"$WORK/sse"
if head -1 "$WORK/sse" | grep -q '^data: {.*"chat.completion.chunk".*"role":"assistant"' && tail -2 "$WORK/sse" | grep -q '^data: \[DONE\]$' \
    && grep -q '"usage":{"prompt_tokens"' "$WORK/sse" && grep -q '"timings"' "$WORK/sse"; then
    ok "SSE: role chunk first, usage + timings in the last chunk, data: [DONE]"
else bad "SSE: $(head -c 600 "$WORK/sse")"; fi
# stop strings: greedy text, then stop at a piece of it
req POST /v1/completions "${AUTH[@]}" "${JSON[@]}" -d '{"prompt":"Once upon a time","max_tokens":12,"temperature":0}'
FULL=$(echo "$BODY" | python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["text"])' 2>/dev/null)
STOP=$(printf '%s' "$FULL" | python3 -c 'import sys; t=sys.stdin.read(); print(t[len(t)//2:len(t)//2+2] if len(t) > 4 else "")')
if [ -n "$STOP" ]; then
    SJ=$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$STOP")
    req POST /v1/completions "${AUTH[@]}" "${JSON[@]}" -d "{\"prompt\":\"Once upon a time\",\"max_tokens\":12,\"temperature\":0,\"stop\":[$SJ]}"
    CUT=$(echo "$BODY" | python3 -c 'import json,sys; d=json.load(sys.stdin)["choices"][0]; print(d["finish_reason"]+"|"+d["text"])')
    EXP=$(python3 -c 'import sys; f,s=sys.argv[1],sys.argv[2]; print("stop|"+f[:f.index(s)])' "$FULL" "$STOP")
    [ "$CUT" = "$EXP" ] && ok "stop string cuts the greedy text before it (finish stop)" || bad "stop: got '$CUT' expected '$EXP'"
fi
req GET /metrics
for m in strata_requests_total strata_prompt_tokens_total strata_generation_tokens_total \
    strata_time_to_first_token_seconds_bucket strata_inter_token_seconds_bucket strata_kv_slots_used strata_queue_depth; do
    echo "$BODY" | grep -q "^$m" || bad "/metrics lacks $m"
done
echo "$BODY" | grep -q 'strata_requests_total{endpoint="chat",code="429"} 1' && echo "$BODY" | grep -q 'strata_requests_total{endpoint="chat",code="413"} 1' \
    && ok "/metrics: requests by status, tokens, TTFT/inter-token histograms, KV slots, queue depth" || bad "/metrics codes"
req GET /v1/cluster "${AUTH[@]}"
echo "$BODY" | python3 -c 'import json,sys; c=json.load(sys.stdin); assert c["nodes"][0]["devices"][0]["memory_total"] > 0 and c["plan"]["stages"][0]["layer_end"] == 2 and c["kv"]["slots_total"] == 2' \
    && ok "/v1/cluster: node, devices, plan, memory, kv" || bad "cluster: $BODY"
req GET /
[ "$CODE" = 200 ] && echo "$BODY" | grep -q '<title>strata</title>' && ok "GET / serves the embedded dashboard ($(echo "$BODY" | wc -c) bytes)" || bad "dashboard: $CODE"

# the official openai npm client
NPM_DIR=$CACHE/npm-serve
if [ ! -d "$NPM_DIR/node_modules/openai" ] && command -v npm >/dev/null; then
    mkdir -p "$NPM_DIR" && (cd "$NPM_DIR" && { [ -f package.json ] || npm init -y >/dev/null; } && npm install --no-audit --no-fund openai >/dev/null 2>&1)
fi
if [ -d "$NPM_DIR/node_modules/openai" ] && command -v node >/dev/null; then
    if timeout 120 node "$ROOT/tests/integration/serve_client.mjs" basic "$URL" key-one "$NAME" "$NPM_DIR"; then
        ok "openai npm client: chat (stream + non-stream), completions, models, errors"
    else bad "openai npm client"; fi
else
    bad "the openai npm package is not installed in $NPM_DIR and npm install failed"
fi

kill -TERM "$SPID"
for _ in $(seq 1 100); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$SPID" 2>/dev/null; then bad "server A did not exit on SIGTERM"; else
    wait "$SPID"; RC=$?
    [ $RC = 0 ] && ok "server A exits 0 on SIGTERM" || bad "server A exit status $RC: $(tail -5 "$WORK/a.log")"
fi

# ---------------------------------------------------------------------------------------------
echo "# server B: load test, $LOAD_CLIENTS streaming clients for $LOAD_SECONDS s"
start_server "$WORK/b.log" --slots 64 --queue 128 --ctx 512
wait_ready
if command -v node >/dev/null; then
    OUT=$(timeout $((LOAD_SECONDS + 120)) node "$ROOT/tests/integration/serve_client.mjs" load "$URL" "$LOAD_CLIENTS" "$LOAD_SECONDS" 16)
    RC=$?
    echo "load: $OUT"
    [ $RC = 0 ] && echo "$OUT" | grep -q '"errors":0' && ok "load test: 0 errors ($OUT)" || bad "load test: rc $RC $OUT"
    echo "load: server mean batch $(metric strata_decode_rows_total) rows / $(metric strata_decode_steps_total) steps"
else
    bad "node is missing: no load test"
fi
[ "$(metric strata_kv_slots_used)" = 0 ] && ok "after the load test every slot is free" || bad "slots still used: $(metric strata_kv_slots_used)"
kill -TERM "$SPID"
for _ in $(seq 1 100); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.1; done
wait "$SPID" 2>/dev/null
RC=$?
[ $RC = 0 ] && ok "server B exits 0 on SIGTERM" || bad "server B exit status $RC: $(tail -20 "$WORK/b.log")"
if grep -q "ERROR: \(AddressSanitizer\|LeakSanitizer\)" "$WORK/a.log" "$WORK/b.log"; then
    bad "sanitizer reports:"; grep -A30 "Sanitizer" "$WORK/a.log" "$WORK/b.log" | head -60
fi

echo "$PASS passed, $FAIL failed"
[ $FAIL = 0 ]
