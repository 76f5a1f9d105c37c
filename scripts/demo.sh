#!/usr/bin/env bash
# Quick start: runs `allot agent` standalone (embedded store, operator in-process) with two
# pools, wires four pods (network namespaces) through Debian's real bridge plugin with
# "ipam": {"type": "allot-ipam"}, shows their addresses, a ping between two of them and
# `allot status`, then removes everything it created.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
require_root "the demo"
ensure_packages
cargo build --workspace --bins --locked --quiet

bin=$PWD/target/debug
work=$(mktemp -d /tmp/allot-demo.XXXXXX)
export ALLOT_SOCKET=$work/allot.sock
bridge=allotdemo0
pods=(web cache db api)
agent_pid=

cleanup() {
    set +e
    for pod in "${pods[@]}"; do
        if ip netns list | grep -qw "allot-demo-$pod"; then
            cni DEL "$pod" >/dev/null 2>&1
            ip netns del "allot-demo-$pod"
        fi
    done
    ip link del "$bridge" 2>/dev/null
    [ -n "$agent_pid" ] && kill -TERM "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# cni COMMAND POD [ANNOTATIONS-JSON] [NAMESPACE]: one call the way a container runtime makes it.
cni() {
    local annotations=${3:-"{}"} namespace=${4:-default}
    printf '{"cniVersion":"1.0.0","name":"demo","type":"bridge","bridge":"%s","isGateway":false,
      "ipam":{"type":"allot-ipam","socket":"%s"},
      "runtimeConfig":{"io.kubernetes.cri.pod-annotations":%s}}' "$bridge" "$ALLOT_SOCKET" "$annotations" |
    CNI_COMMAND=$1 CNI_CONTAINERID="demo-$2" CNI_NETNS="/var/run/netns/allot-demo-$2" CNI_IFNAME=eth0 \
    CNI_PATH="$bin:/usr/lib/cni" \
    CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=$namespace;K8S_POD_NAME=$2" \
    /usr/lib/cni/bridge
}

echo "== allot agent (standalone) with pools default and blue"
"$bin/allot" agent --node demo-node --data-dir "$work/data" --socket "$ALLOT_SOCKET" \
    --pool default=10.244.0.0/16@24,fd00:244::/104@120 --pool blue=10.245.0.0/16@26 \
    2>"$work/agent.log" &
agent_pid=$!
for _ in $(seq 100); do "$bin/allot" status >/dev/null 2>&1 && break; sleep 0.1; done
"$bin/allot" namespace annotate team-blue ipam.cilium.io/ip-pool=blue

add() { # POD ANNOTATIONS NAMESPACE
    ip netns add "allot-demo-$1"
    cni ADD "$1" "$2" "$3" >/dev/null
    printf '  %-6s %-34s %s\n' "$1" "($4)" "$(ip netns exec "allot-demo-$1" ip -br addr show eth0 | awk '{$1=$2=""; print}' | sed 's/ fe80::[^ ]*//')"
}
echo "== pods through the bridge plugin with allot-ipam"
add web   '{}'                                     default   "plain pod: default pool"
add cache '{}'                                     default   "plain pod: default pool"
add db    '{"ipam.cilium.io/ip-pool":"blue"}'      default   "pod annotation: blue"
add api   '{}'                                     team-blue "namespace annotation: blue"

cache_ip=$(ip netns exec allot-demo-cache ip -4 -br addr show eth0 | awk '{print $3}' | cut -d/ -f1)
echo "== web -> cache over the bridge"
ip netns exec allot-demo-web ping -c 1 -W 2 "$cache_ip" | sed -n '2p'

echo "== allot status"
"$bin/allot" status
echo "== allot allocations list"
"$bin/allot" allocations list
echo "== allot node get -o yaml"
"$bin/allot" node get -o yaml
echo "== cleaning up"
