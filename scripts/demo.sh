#!/usr/bin/env bash
# Quick start: runs `allot agent` standalone (embedded store, operator in-process) with two
# pools, wires four pods (network namespaces) through Debian's real ptp plugin with the
# README's conflist ("ipam": {"type": "allot-ipam"}, the pod-annotations capability), inside a
# node namespace, shows their addresses, pings across pools and `allot status`, then removes
# everything it created.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
require_root "the demo"
ensure_packages
cargo build --workspace --bins --locked --quiet
build_plugin debug   # static, as scripts/install.sh installs it

bin=$PWD/target/debug
work=$(mktemp -d /tmp/allot-demo.XXXXXX)
export ALLOT_SOCKET=$work/allot.sock
node=allot-demo-node
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
    ip netns del "$node" 2>/dev/null
    [ -n "$agent_pid" ] && kill -TERM "$agent_pid" 2>/dev/null && wait "$agent_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

# cni COMMAND POD [ANNOTATIONS-JSON] [NAMESPACE]: one call the way a container runtime makes
# it with the README's conflist: the plugin declares the pod-annotations capability, so the
# runtime adds the pod's annotations as runtimeConfig (the kubelet always sets some).
cni() {
    local annotations=${3:-'{"kubernetes.io/config.source":"api"}'} namespace=${4:-default}
    printf '{"cniVersion":"1.0.0","name":"demo","type":"ptp",
      "ipam":{"type":"allot-ipam","socket":"%s"},
      "capabilities":{"io.kubernetes.cri.pod-annotations":true},
      "runtimeConfig":{"io.kubernetes.cri.pod-annotations":%s}}' "$ALLOT_SOCKET" "$annotations" |
    CNI_COMMAND=$1 CNI_CONTAINERID="demo-$2" CNI_NETNS="/var/run/netns/allot-demo-$2" CNI_IFNAME=eth0 \
    CNI_PATH="$bin:/usr/lib/cni" \
    CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=$namespace;K8S_POD_NAME=$2" \
    ip netns exec "$node" /usr/lib/cni/ptp
}

echo "== allot agent (standalone) with pools default and blue"
"$bin/allot" agent --node demo-node --data-dir "$work/data" --socket "$ALLOT_SOCKET" \
    --pool default=10.244.0.0/16@24,fd00:244::/104@120 --pool blue=10.245.0.0/16@26 \
    2>"$work/agent.log" &
agent_pid=$!
for _ in $(seq 100); do "$bin/allot" status >/dev/null 2>&1 && break; sleep 0.1; done
"$bin/allot" namespace annotate team-blue ipam.cilium.io/ip-pool=blue
# The node: ptp puts each pod's host side here and routes between them.
ip netns add "$node"
ip netns exec "$node" sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1

add() { # POD ANNOTATIONS NAMESPACE
    ip netns add "allot-demo-$1"
    cni ADD "$1" "$2" "$3" >/dev/null
    printf '  %-6s %-34s %s\n' "$1" "($4)" "$(ip netns exec "allot-demo-$1" ip -br addr show eth0 | awk '{$1=$2=""; print}' | sed 's/ fe80::[^ ]*//')"
}
echo "== pods through the ptp plugin with allot-ipam"
add web   ''                                       default   "plain pod: default pool"
add cache ''                                       default   "plain pod: default pool"
add db    '{"ipam.cilium.io/ip-pool":"blue"}'      default   "pod annotation: blue"
add api   ''                                       team-blue "namespace annotation: blue"

ipv4() { ip netns exec "allot-demo-$1" ip -4 -br addr show eth0 | awk '{print $3}' | cut -d/ -f1; }
echo "== web's routes (default via its block's gateway, held by the node)"
ip netns exec allot-demo-web ip route | sed 's/^/  /'
echo "== web -> cache (default pool), web -> db (blue), through the node"
for to in cache db; do ip netns exec allot-demo-web ping -c 1 -W 2 "$(ipv4 "$to")" | sed -n '2p'; done

echo "== allot status"
"$bin/allot" status
echo "== allot allocations list"
"$bin/allot" allocations list
echo "== allot node get -o yaml"
"$bin/allot" node get -o yaml
echo "== cleaning up"
