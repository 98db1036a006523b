#!/usr/bin/env bash
# test_cluster_netns.sh — three nodes in three network namespaces joined by veth pairs to a
# bridge (in a fourth namespace), with `tc netem` delay 2 ms and 1% loss on every node's link
# where the kernel has sch_netem (otherwise that part is skipped with a NOTE, plain veth).
# The coordinator runs in the first node's namespace. Checks: the cluster forms over tcp
# (separate namespaces: no shm), the greedy ids equal the single-node run and transformers'
# (golden), and reports the per-hop latency; the LAN beacon: every node announces itself
# (--beacon), a coordinator started with --discover finds exactly the three nodes of its
# cluster, ignores a fourth node that beacons with another cluster key, plans on the measured
# links (with netem: >= 2 ms latency measured) and generates the same ids; `strata plan
# --discover` prints the plan. Skips (exit 0 with a message) when network
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
trap - ERR # from here on a failing command is a check, not a setup error
netem=1
for i in 0 1 2; do
    if ! ip netns exec "${tag}n$i" tc qdisc add dev eth0 root netem delay 2ms loss 1% 2>"$tmp/tc.err"; then
        netem=0
    fi
done
[ $netem = 1 ] || echo "NOTE: tc netem unavailable here ($(head -1 "$tmp/tc.err")): running over plain veth, no delay/loss"

for i in 0 1 2; do
    ip netns exec "${tag}n$i" "$bin" node --listen "10.77.0.$((i + 1)):7700" --threads 1 --no-bw-probe \
        --beacon 7799 --beacon-ms 200 >"$tmp/n$i.log" 2>&1 &
    pids+=($!)
done
# a node of another cluster on the same LAN, beaconing on the same port
ip netns exec "${tag}n2" "$bin" node --listen "10.77.0.3:7701" --threads 1 --no-bw-probe --cluster-key "other-cluster" \
    --beacon 7799 --beacon-ms 200 >"$tmp/rogue.log" 2>&1 &
pids+=($!)
for i in 0 1 2; do
    for _ in $(seq 100); do grep -q listening "$tmp/n$i.log" 2>/dev/null && break; sleep 0.05; done
done
peers="10.77.0.1:7700,10.77.0.2:7700,10.77.0.3:7700"
m=$fx/models/minimax_m2-mlx-q5g64
ref=$(timeout 60 "$bin" cluster-gen "$m" --local --golden 2 --max-tokens 12 2>/dev/null | grep '^ids:')
out=$(timeout 120 ip netns exec "${tag}n0" "$bin" cluster-gen "$m" --peers "$peers" --split even --golden 2 --max-tokens 12 \
    --heartbeat-ms 200 --dead-ms 3000 2>"$tmp/err")
rc=$?
[ $rc -eq 0 ] || fail "cluster over netem failed: $(tail -3 "$tmp/err")"
grep -q "golden: greedy 12/12 match" <<<"$out" || fail "greedy differs from transformers: $out"
[ -n "$ref" ] && [ "$(grep '^ids:' <<<"$out")" = "$ref" ] || fail "ids differ from the single-node run"
grep -q "link tcp" "$tmp/err" || fail "expected tcp links between namespaces"
grep '^stats:' "$tmp/err"

# ---------------------------------------------------------------------------------------------
# LAN beacon: discovery instead of --peers, the planner on the measured links
out=$(timeout 120 ip netns exec "${tag}n0" "$bin" cluster-gen "$m" --discover 7799:2 --objective throughput \
    --golden 2 --max-tokens 12 --heartbeat-ms 200 --dead-ms 3000 2>"$tmp/err")
rc=$?
[ $rc -eq 0 ] || fail "cluster-gen --discover failed: $(tail -3 "$tmp/err")"
grep -q "discovered 3 nodes: $peers\$" "$tmp/err" || fail "discovery did not find exactly the 3 nodes: $(grep -i 'discover' "$tmp/err")"
grep -q "beacon from 10.77.0.3 ignored: wrong cluster key" "$tmp/err" || fail "the other cluster's beacon was not ignored"
grep -q "7701" "$tmp/err" && fail "the other cluster's node was used"
grep -q "golden: greedy 12/12 match" <<<"$out" || fail "discovered cluster: greedy differs from transformers: $out"
[ "$(grep '^ids:' <<<"$out")" = "$ref" ] || fail "discovered cluster: ids differ from the single-node run"
nl=$(grep -cE "link 10\.77\.0\.[0-9]:7700 -> 10\.77\.0\.[0-9]:7700 \(tcp\): latency" "$tmp/err")
[ "$nl" = 6 ] || fail "expected 6 measured tcp links, got $nl"
grep -E "link 10\.77.* latency" "$tmp/err" | head -2
grep -E "^plan: stages" "$tmp/err"
if [ $netem = 1 ]; then
    # every probed link crosses two 2 ms qdiscs (one per namespace): >= 2 ms one way
    low=$(sed -nE 's/.*link 10\.77.*latency ([0-9.]+) us.*/\1/p' "$tmp/err" | awk '$1 < 2000' | wc -l)
    [ "$low" = 0 ] || fail "netem: $low link(s) measured below 2 ms"
else
    echo "SKIP: netem delay/loss checks (tc netem unavailable on this kernel: sch_netem missing)"
fi
pl=$(timeout 60 ip netns exec "${tag}n0" "$bin" plan "$m" --discover 7799:2 2>"$tmp/err")
grep -q "^cluster  live: 3 devices" <<<"$pl" || fail "plan --discover: $(tail -2 "$tmp/err")"
if timeout 20 ip netns exec "${tag}n0" "$bin" cluster-gen "$m" --discover 7799:1 --cluster-key "no-such-cluster" \
    --prompt-ids 1 --max-tokens 2 >/dev/null 2>"$tmp/err"; then
    fail "discovery with a key no node has found nodes"
fi
grep -q "no node of this cluster announced itself" "$tmp/err" || fail "discovery without matching beacons: $(tail -1 "$tmp/err")"

for i in 0 1 2; do kill -0 "${pids[$i]}" 2>/dev/null || fail "node $i died"; done
if grep -l "AddressSanitizer\|runtime error" "$tmp"/*.log "$tmp/err" 2>/dev/null; then fail "sanitizer report"; fi
echo "test_cluster_netns: $failures failure(s)"
[ $failures -eq 0 ]
