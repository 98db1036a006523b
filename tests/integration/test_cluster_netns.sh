#!/usr/bin/env bash
# test_cluster_netns.sh — three nodes in three network namespaces joined by veth pairs to a
# bridge (in a fourth namespace), with `tc netem` delay 2 ms and 1% loss on every node's link.
# The coordinator runs in the first node's namespace. Checks: the cluster forms over tcp
# (separate namespaces: no shm), the greedy ids equal the single-node run and transformers'
# (golden), and reports the per-hop latency. Skips (exit 0 with a message) when network
# namespaces cannot be created (no root / no CAP_NET_ADMIN). Traffic stays inside the
# namespaces this script creates; all of them are deleted on exit.
#
# usage: bash tests/integration/test_cluster_netns.sh STRATA_BINARY REPO_ROOT
set -u
bin=${1:?usage: test_cluster_netns.sh STRATA_BINARY REPO_ROOT}
root=${2:?usage: test_cluster_netns.sh STRATA_BINARY REPO_ROOT}
fx=${STRATA_FIXTURES:-$root/tests/fixtures}
bin=$(readlink -f "$bin")
export STRATA_CLUSTER_KEY="netns-key-$$"
tag="st$$"
br="${tag}br"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/strata-netns-XXXXXX") || exit 1
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null; done
    wait 2>/dev/null
    for i in 0 1 2; do ip netns del "${tag}n$i" 2>/dev/null; done
    ip netns del "$br" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

if ! ip netns add "$br" 2>/dev/null; then
    echo "SKIP: cannot create network namespaces here (needs root / CAP_NET_ADMIN)"
    exit 0
fi
failures=0
fail() { echo "FAIL: $*" >&2; failures=$((failures + 1)); }
set -e
trap 'cleanup' ERR
ip -n "$br" link add br0 type bridge
ip -n "$br" link set br0 up
ip -n "$br" link set lo up
for i in 0 1 2; do
    ns="${tag}n$i"
    ip netns add "$ns"
    ip link add "${tag}a$i" type veth peer name "${tag}b$i"
    ip link set "${tag}a$i" netns "$ns"
    ip link set "${tag}b$i" netns "$br"
    ip -n "$ns" link set "${tag}a$i" name eth0
    ip -n "$ns" addr add "10.77.0.$((i + 1))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    ip -n "$br" link set "${tag}b$i" master br0
    ip -n "$br" link set "${tag}b$i" up
done
set +e
netem=1
for i in 0 1 2; do
    if ! ip netns exec "${tag}n$i" tc qdisc add dev eth0 root netem delay 2ms loss 1% 2>"$tmp/tc.err"; then
        netem=0
    fi
done
[ $netem = 1 ] || echo "NOTE: tc netem unavailable here ($(head -1 "$tmp/tc.err")): running over plain veth, no delay/loss"

for i in 0 1 2; do
    ip netns exec "${tag}n$i" "$bin" node --listen "10.77.0.$((i + 1)):7700" --threads 1 --no-bw-probe \
        >"$tmp/n$i.log" 2>&1 &
    pids+=($!)
done
for i in 0 1 2; do
    for _ in $(seq 100); do grep -q listening "$tmp/n$i.log" 2>/dev/null && break; sleep 0.05; done
done
peers="10.77.0.1:7700,10.77.0.2:7700,10.77.0.3:7700"
m=$fx/models/minimax_m2-mlx-q5g64
ref=$(timeout 60 "$bin" cluster-gen "$m" --local --golden 2 --max-tokens 12 2>/dev/null | grep '^ids:')
out=$(timeout 120 ip netns exec "${tag}n0" "$bin" cluster-gen "$m" --peers "$peers" --golden 2 --max-tokens 12 \
    --heartbeat-ms 200 --dead-ms 3000 2>"$tmp/err")
rc=$?
[ $rc -eq 0 ] || fail "cluster over netem failed: $(tail -3 "$tmp/err")"
grep -q "golden: greedy 12/12 match" <<<"$out" || fail "greedy differs from transformers: $out"
[ -n "$ref" ] && [ "$(grep '^ids:' <<<"$out")" = "$ref" ] || fail "ids differ from the single-node run"
grep -q "link tcp" "$tmp/err" || fail "expected tcp links between namespaces"
grep '^stats:' "$tmp/err"
for i in 0 1 2; do kill -0 "${pids[$i]}" 2>/dev/null || fail "node $i died"; done
echo "test_cluster_netns: $failures failure(s)"
[ $failures -eq 0 ]
