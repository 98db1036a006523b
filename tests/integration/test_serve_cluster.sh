#!/usr/bin/env bash
# test_serve_cluster.sh — `strata serve MODEL --peers ...`: the OpenAI server on a cluster of
# `strata node` processes on 127.0.0.1 (random free ports).
#
#   bash tests/integration/test_serve_cluster.sh STRATA_BIN REPO_ROOT
#
# Model: the tiny random Qwen3 of test_serve.sh with 4 layers (so 2 and 3 stages split it) and
# the real Qwen3 tokenizer from $STRATA_CACHE/tokenizers/qwen3 (tools/fetch-test-assets.sh);
# skipped without it. Checks, in order:
#   reference     single-node `strata serve`: greedy chat completions for 3 prompts
#   equivalence   2 stages (tcp) and 3 stages (shm): the same text, finish reason and token
#                 count, non-streaming and streaming (SSE: role chunk, deltas, usage, [DONE]);
#                 /v1/cluster shows the plan, /metrics the per-stage and per-hop timings
#   concurrency   8 streaming requests at once on 4 slots: every one equals its reference
#   limits        logprobs / logit_bias -> 400 naming the cluster; a stop string cuts the text
#   disconnect    4 clients that go away mid-stream: slots free at once, a later request is
#                 served with the right text
#   node loss     SIGKILL of stage 1 in the middle of a 300-token request: it completes with
#                 the text of the uninterrupted run (re-plan on 2 nodes + replay), and so does
#                 the next request
# Every wait is bounded (curl/python timeouts, polling loops); every process started here is
# killed on exit.
set -u
BIN=$(readlink -f "${1:?usage: test_serve_cluster.sh STRATA_BIN REPO_ROOT}")
ROOT=$(readlink -f "${2:?usage: test_serve_cluster.sh STRATA_BIN REPO_ROOT}")
CACHE=${STRATA_CACHE:-$ROOT/.cache}
export STRATA_CLUSTER_KEY="serve-cluster-$$-$RANDOM"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/strata-serve-cluster.XXXXXX") || exit 1
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -CONT "$p" 2>/dev/null; kill -TERM "$p" 2>/dev/null; done
    sleep 0.3
    for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null; done
    wait 2>/dev/null
    [ -n "${KEEP_WORK:-}" ] && echo "work dir kept: $WORK" || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 1' INT TERM
PASS=0
FAIL=0
ok() { echo "ok - $*"; PASS=$((PASS + 1)); }
bad() { echo "FAIL - $*"; FAIL=$((FAIL + 1)); }
skip() { echo "SKIP: $*"; exit 0; }

TOKDIR=$CACHE/tokenizers/qwen3
[ -f "$TOKDIR/tokenizer.json" ] || skip "no Qwen3 tokenizer in $TOKDIR (run tools/fetch-test-assets.sh)"
command -v node >/dev/null || skip "node is needed (writes the test model)"
command -v python3 >/dev/null || skip "python3 is needed (HTTP client)"
command -v curl >/dev/null || skip "curl is missing"

MODEL=$CACHE/models/serve-tiny-qwen3-l4
if [ ! -f "$MODEL/model.safetensors" ] || [ ! -f "$MODEL/tokenizer.json" ]; then
    mkdir -p "$CACHE/models"
    rm -rf "$MODEL.tmp.$$"
    node "$ROOT/tests/integration/serve_client.mjs" model "$MODEL.tmp.$$" "$TOKDIR" 4 >/dev/null ||
        { echo "FAIL - cannot write the test model"; exit 1; }
    rm -rf "$MODEL" && mv "$MODEL.tmp.$$" "$MODEL"
fi

# ---------------------------------------------------------------------------------------------
# an HTTP client (python3, standard library only; every call has a timeout)
cat >"$WORK/client.py" <<'EOF'
import http.client, json, sys, threading, time

PROMPTS = ["Say hello.", "Count to five.", "Tell a long story about a cat."]

def body(i, max_tokens, stream, extra=None):
    b = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": max_tokens,
         "temperature": 0, "stream": stream}
    if stream:
        b["stream_options"] = {"include_usage": True}
    b.update(extra or {})
    return json.dumps(b)

def post(port, data, timeout=60):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request("POST", "/v1/chat/completions", data, {"Content-Type": "application/json"})
    return c, c.getresponse()

def chat(port, i, max_tokens, extra=None):
    c, r = post(port, body(i, max_tokens, False, extra))
    d = json.loads(r.read())
    c.close()
    if r.status != 200:
        return {"status": r.status, "error": d.get("error", {}).get("message", "")}
    ch = d["choices"][0]
    return {"status": 200, "text": ch["message"]["content"], "finish": ch["finish_reason"],
            "n": d["usage"]["completion_tokens"]}

def stream(port, i, max_tokens):
    c, r = post(port, body(i, max_tokens, True))
    if r.status != 200:
        return {"status": r.status, "error": r.read().decode(errors="replace")}
    text, finish, usage, done, first_role, n_chunks = "", None, None, False, False, 0
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        p = line[6:]
        if p == "[DONE]":
            done = True
            break
        ev = json.loads(p)
        n_chunks += 1
        if ev.get("usage"):
            usage = ev["usage"]
        for ch in ev.get("choices", []):
            if n_chunks == 1 and ch.get("delta", {}).get("role") == "assistant":
                first_role = True
            text += ch.get("delta", {}).get("content") or ""
            finish = ch.get("finish_reason") or finish
    c.close()
    return {"status": 200, "text": text, "finish": finish, "n": usage["completion_tokens"] if usage else -1,
            "done": done, "role_first": first_role, "chunks": n_chunks}

def many(port, n, max_tokens):
    out = [None] * n
    def one(k):
        try:
            out[k] = stream(port, k, max_tokens)
        except Exception as e:
            out[k] = {"status": 0, "error": repr(e)}
    ts = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in ts: t.start()
    for t in ts: t.join(120)
    return out

def walk_away(port, n, max_tokens):
    """n streaming clients that read their first content chunk and close the connection."""
    conns = []
    for k in range(n):
        conns.append(post(port, body(k, max_tokens, True)))
    for c, r in conns:
        got = 0
        while got < 2:
            line = r.readline()
            if not line: break
            if line.startswith(b"data: "): got += 1
    for c, r in conns:
        c.sock.close()
        c.close()
    return {"closed": n}

cmd, port = sys.argv[1], int(sys.argv[2])
args = [int(a) if a.lstrip("-").isdigit() else a for a in sys.argv[3:]]
if cmd == "chat":
    extra = json.loads(args[2]) if len(args) > 2 else None
    print(json.dumps(chat(port, args[0], args[1], extra)))
elif cmd == "stream":
    print(json.dumps(stream(port, args[0], args[1])))
elif cmd == "many":
    print(json.dumps(many(port, args[0], args[1])))
elif cmd == "walk_away":
    print(json.dumps(walk_away(port, args[0], args[1])))
EOF
client() { timeout 150 python3 "$WORK/client.py" "$@"; }
jget() { python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(eval(sys.argv[2]))' "$1" "$2" 2>/dev/null; }

# ---------------------------------------------------------------------------------------------
# processes

declare -a NODE_PID NODE_PORT
# start_node I: a node on a random free port; its log is $WORK/nI.log
start_node() {
    local i=$1
    rm -f "$WORK/p$i"
    "$BIN" node --listen 127.0.0.1:0 --port-file "$WORK/p$i" --threads 1 --no-bw-probe >>"$WORK/n$i.log" 2>&1 &
    NODE_PID[$i]=$!
    PIDS+=("$!")
    for _ in $(seq 100); do
        [ -s "$WORK/p$i" ] && break
        sleep 0.05
    done
    NODE_PORT[$i]=$(cat "$WORK/p$i" 2>/dev/null)
    [ -n "${NODE_PORT[$i]}" ] || { bad "node $i did not start: $(tail -3 "$WORK/n$i.log")"; exit 1; }
}
peers() {
    local s="" i
    for i in "$@"; do s="$s${s:+,}127.0.0.1:${NODE_PORT[$i]}"; done
    echo "$s"
}
# start_server LOG ARGS...: strata serve on an ephemeral port; sets PORT, SPID, URL; waits
# (bounded) until /health answers 200
start_server() {
    local log=$1
    shift
    rm -f "$WORK/port"
    "$BIN" serve "$MODEL" --port 0 --port-file "$WORK/port" --threads 1 --slots 4 --ctx 512 "$@" >"$log" 2>&1 &
    SPID=$!
    PIDS+=("$SPID")
    for _ in $(seq 100); do
        [ -s "$WORK/port" ] && break
        sleep 0.05
    done
    PORT=$(cat "$WORK/port" 2>/dev/null)
    [ -n "$PORT" ] || { bad "the server did not start: $(tail -5 "$log")"; exit 1; }
    URL=http://127.0.0.1:$PORT
    for _ in $(seq 300); do
        [ "$(curl -s -m 2 -o /dev/null -w '%{http_code}' "$URL/health")" = 200 ] && return 0
        kill -0 "$SPID" 2>/dev/null || break
        sleep 0.1
    done
    bad "the server never became ready: $(tail -5 "$log")"
    exit 1
}
stop_server() {
    kill -TERM "$SPID" 2>/dev/null
    for _ in $(seq 100); do kill -0 "$SPID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$SPID" 2>/dev/null; then
        bad "$1: the server ignored SIGTERM"
        kill -KILL "$SPID" 2>/dev/null
    else
        wait "$SPID"
        local rc=$?
        [ $rc = 0 ] && ok "$1: the server exits 0 on SIGTERM" || bad "$1: exit status $rc: $(tail -5 "$2")"
    fi
}
metric() { curl -s -m 5 "$URL/metrics" | awk -v k="$1" '$1 == k { print $2 }'; }

# ---------------------------------------------------------------------------------------------
echo "# reference: single-node serve"
start_server "$WORK/ref.log"
declare -a REF
for i in 0 1 2; do
    REF[$i]=$(client chat "$PORT" $i 24)
    [ "$(jget "${REF[$i]}" 'd["status"]')" = 200 ] || { bad "reference $i: ${REF[$i]}"; exit 1; }
done
ok "single-node references: $(jget "${REF[0]}" 'd["n"]'), $(jget "${REF[1]}" 'd["n"]'), $(jget "${REF[2]}" 'd["n"]') tokens"
stop_server "reference" "$WORK/ref.log"

for i in 0 1 2; do start_node $i; done
P3=$(peers 0 1 2)

# same_as_ref JSON I WHAT: text, finish reason and token count equal reference I
same_as_ref() {
    local got=$1 i=$2 what=$3
    local a b
    a=$(jget "$got" '(d["text"], d["finish"], d["n"])')
    b=$(jget "${REF[$i]}" '(d["text"], d["finish"], d["n"])')
    if [ -n "$a" ] && [ "$a" = "$b" ]; then ok "$what"; else bad "$what: got $got, single node ${REF[$i]}"; fi
}

for stages in 2 3; do
    x=tcp
    [ $stages = 3 ] && x=shm
    echo "# cluster: $stages stages ($x)"
    start_server "$WORK/c$stages.log" --peers "$P3" --stages $stages --xport $x
    CL=$(curl -s -m 5 "$URL/v1/cluster")
    if python3 -c 'import json,sys; c=json.loads(sys.argv[1]); s=c["plan"]["stages"]; n=int(sys.argv[2]);
assert c["mode"] == "cluster" and len(s) == n and len(c["nodes"]) == n and s[0]["layer_begin"] == 0
assert s[-1]["layer_end"] == 4 and all(s[k]["layer_end"] == s[k+1]["layer_begin"] for k in range(n-1))
assert all(d["weights_bytes"] > 0 and d["memory_total"] > 0 for nd in c["nodes"] for d in nd["devices"])
assert len(c["links"]) == n and all(l["kind"] == sys.argv[3] for l in c["links"]) and c["kv"]["slots_total"] == 4' \
        "$CL" $stages $x; then
        ok "/v1/cluster: $stages stages covering layers 0..3, nodes with devices and memory, $x links"
    else bad "/v1/cluster ($stages stages): $CL"; fi
    for i in 0 1 2; do same_as_ref "$(client chat "$PORT" $i 24)" $i "$stages stages: chat $i equals the single-node text"; done
    S=$(client stream "$PORT" 1 24)
    same_as_ref "$S" 1 "$stages stages: streamed chat equals the single-node text"
    [ "$(jget "$S" 'd["done"] and d["role_first"] and d["chunks"] > 3')" = True ] &&
        ok "$stages stages: SSE role chunk first, $(jget "$S" 'd["chunks"]') chunks, usage, data: [DONE]" ||
        bad "$stages stages: SSE shape: $S"
    if [ $stages = 3 ]; then
        # 8 streams at once on 4 slots (4 wait in the queue, then take freed slots)
        M=$(client many "$PORT" 8 24)
        good=$(python3 -c 'import json,sys; m=json.loads(sys.argv[1]); r=[json.loads(a) for a in sys.argv[2:5]]
print(sum(1 for k, x in enumerate(m) if x.get("status") == 200 and x["done"] and (x["text"], x["finish"], x["n"]) == (r[k%3]["text"], r[k%3]["finish"], r[k%3]["n"])))' \
            "$M" "${REF[0]}" "${REF[1]}" "${REF[2]}")
        [ "$good" = 8 ] && ok "8 concurrent streams on 4 slots: all complete with the single-node text" ||
            bad "concurrency: $good/8 correct: $(echo "$M" | head -c 800)"
        # what the last stage cannot do: a clear 400
        R=$(client chat "$PORT" 0 4 '{"logprobs":true}')
        [ "$(jget "$R" 'd["status"]')" = 400 ] && echo "$R" | grep -q "logprobs are not available when serving from a cluster" &&
            ok "logprobs -> 400: $(jget "$R" 'd["error"]')" || bad "logprobs: $R"
        R=$(client chat "$PORT" 0 4 '{"logit_bias":{"100":5}}')
        [ "$(jget "$R" 'd["status"]')" = 400 ] && echo "$R" | grep -q "logit_bias is not supported" &&
            ok "logit_bias -> 400" || bad "logit_bias: $R"
        # a stop string inside the greedy text: cut before it, finish "stop", the slot is freed
        FULL=$(jget "${REF[2]}" 'd["text"]')
        STOP=$(python3 -c 'import sys; t=sys.argv[1]; print(t[len(t)//2:len(t)//2+3] if len(t) > 6 else "")' "$FULL")
        if [ -n "$STOP" ]; then
            SJ=$(python3 -c 'import json,sys; print(json.dumps({"stop": [sys.argv[1]]}))' "$STOP")
            R=$(client chat "$PORT" 2 24 "$SJ")
            EXP=$(python3 -c 'import sys; f,s=sys.argv[1],sys.argv[2]; print("stop|"+f[:f.index(s)])' "$FULL" "$STOP")
            [ "$(jget "$R" 'd["finish"]+"|"+d["text"]')" = "$EXP" ] && ok "stop string cuts the text (finish stop)" ||
                bad "stop string: got $R, expected '$EXP'"
        fi
        # per-stage and per-hop timings from the coordinator
        MT=$(curl -s -m 5 "$URL/metrics")
        for k in 'strata_hop_seconds_sum{hop="0->1"}' 'strata_hop_seconds_count{hop="2->0"}' \
            'strata_stage_compute_seconds_sum{stage="2",' strata_cluster_tokens_total; do
            grep -qF "$k" <<<"$MT" || bad "/metrics lacks $k"
        done
        n01=$(awk '$1 == "strata_hop_seconds_count{hop=\"0->1\"}" { print $2 }' <<<"$MT")
        [ "${n01:-0}" -gt 0 ] 2>/dev/null && ok "/metrics: per-stage compute and per-hop timings ($n01 samples on 0->1)" ||
            bad "/metrics hop samples: ${n01:-none}"
        # clients that go away: their slots free at once and the pipeline serves the next one
        C0=$(metric strata_requests_cancelled_total)
        W=$(client walk_away "$PORT" 4 400)
        for _ in $(seq 100); do
            [ "$(metric strata_kv_slots_used)" = 0 ] && break
            sleep 0.05
        done
        C1=$(metric strata_requests_cancelled_total)
        [ "$(metric strata_kv_slots_used)" = 0 ] && [ $((C1 - C0)) -ge 4 ] &&
            ok "4 disconnected clients cancelled ($((C1 - C0))), every slot free" ||
            bad "disconnect: $W; slots used $(metric strata_kv_slots_used), cancelled $C0 -> $C1"
        same_as_ref "$(client chat "$PORT" 0 24)" 0 "after the disconnects a request is served with the right text"
        same_as_ref "$(client stream "$PORT" 1 24)" 1 "... and a streamed one"
    fi
    stop_server "$stages stages" "$WORK/c$stages.log"
done

# ---------------------------------------------------------------------------------------------
echo "# node loss mid-request"
# --batch 1: prompts (and replays) are prefilled one token per step, the way decode steps run,
# so the replayed KV is bit-identical and the greedy text after recovery must equal the
# uninterrupted run exactly. (With chunked prefill the batched kernels round differently from
# the one-row decode, and this random model's near-tied logits can then flip.)
start_server "$WORK/loss.log" --peers "$P3" --stages 3 --batch 1
BASE=$(client chat "$PORT" 2 300)
[ "$(jget "$BASE" 'd["n"]')" = 300 ] || bad "node loss: the uninterrupted run: $BASE"
T0=$(metric strata_cluster_tokens_total)
client chat "$PORT" 2 300 >"$WORK/loss.out" &
CPID=$!
PIDS+=("$CPID")
for _ in $(seq 300); do
    t=$(metric strata_cluster_tokens_total)
    [ "${t:-0}" -ge $((T0 + 30)) ] && break
    sleep 0.02
done
kill -KILL "${NODE_PID[1]}"
echo "killed stage 1 after $(($(metric strata_cluster_tokens_total) - T0)) tokens"
wait "$CPID" 2>/dev/null
R=$(cat "$WORK/loss.out")
a=$(jget "$R" '(d["text"], d["finish"], d["n"])')
b=$(jget "$BASE" '(d["text"], d["finish"], d["n"])')
[ -n "$a" ] && [ "$a" = "$b" ] && ok "the request survives SIGKILL of stage 1: the same 300 tokens as the uninterrupted run" ||
    bad "node loss: got $(echo "$R" | head -c 300), expected $(echo "$BASE" | head -c 300)"
[ "$(metric strata_cluster_recoveries_total)" -ge 1 ] 2>/dev/null && ok "recovery counted in /metrics" ||
    bad "no recovery in /metrics"
grep -q "lost: " "$WORK/loss.log" && grep -q "replaying" "$WORK/loss.log" && ok "loss and replay logged" ||
    bad "loss/replay not logged: $(grep -E 'lost|replay' "$WORK/loss.log" | head -3)"
CL=$(curl -s -m 5 "$URL/v1/cluster")
[ "$(jget "$CL" 'len(d["plan"]["stages"])')" = 2 ] && ok "/v1/cluster after the loss: 2 stages" || bad "cluster after loss: $CL"
R=$(client chat "$PORT" 2 300)
a=$(jget "$R" '(d["text"], d["n"])')
b=$(jget "$BASE" '(d["text"], d["n"])')
[ -n "$a" ] && [ "$a" = "$b" ] && ok "after the recovery the next request is served on 2 stages with the same text" ||
    bad "after recovery: $(echo "$R" | head -c 300)"
stop_server "node loss" "$WORK/loss.log"

for i in 0 2; do kill -TERM "${NODE_PID[$i]}" 2>/dev/null; done
for i in 0 2; do
    for _ in $(seq 100); do kill -0 "${NODE_PID[$i]}" 2>/dev/null || break; sleep 0.05; done
    grep -q "node stopped" "$WORK/n$i.log" && ok "node $i stops cleanly" || bad "node $i did not stop cleanly"
done
if grep -l "AddressSanitizer\|LeakSanitizer\|runtime error" "$WORK"/*.log 2>/dev/null; then
    bad "sanitizer report:"
    grep -h -A20 "Sanitizer\|runtime error" "$WORK"/*.log | head -60
fi

echo "test_serve_cluster: $PASS passed, $FAIL failed"
[ $FAIL = 0 ]
