#!/usr/bin/env bash
# The cluster lab: NODES nodes as network namespaces joined by a bridge in a namespace of their
# own, etcd on that bridge, an operator, an agent per node with direct routes, and pods in two
# pools wired by Debian's bridge plugin with allot-ipam. Shows the pods' addresses, the routes,
# pings between pods on different nodes, and `allot status`; removes everything it created.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
require_root "the lab"
ensure_packages
cargo build --workspace --bins --locked --quiet
build_plugin debug   # static, as scripts/install.sh installs it

NODES=${NODES:-3}
bin=$PWD/target/debug
work=$(mktemp -d /tmp/allot-lab.XXXXXX)
fabric=allot-lab-fabric
etcd_url=http://10.250.0.1:2379
pids=()
namespaces=()

cleanup() {
    set +e
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
    for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null; done
    rm -rf "$work"
}
trap cleanup EXIT

netns() { ip netns add "$1"; namespaces+=("$1"); ip netns exec "$1" ip link set lo up; }
# Background processes are started with `ip netns exec` directly, so $! is the process itself.
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
allot_cluster() { in_ns "$fabric" "$bin/allot" --etcd-endpoints "$etcd_url" "$@"; }

echo "== fabric: bridge fab0 (10.250.0.1/24) and etcd in namespace $fabric"
netns "$fabric"
in_ns "$fabric" ip link add fab0 type bridge
in_ns "$fabric" ip addr add 10.250.0.1/24 dev fab0
in_ns "$fabric" ip link set fab0 up
ip netns exec "$fabric" etcd --name lab --data-dir "$work/etcd" --listen-client-urls "$etcd_url" \
    --advertise-client-urls "$etcd_url" --listen-peer-urls http://10.250.0.1:2380 \
    --initial-advertise-peer-urls http://10.250.0.1:2380 --initial-cluster lab=http://10.250.0.1:2380 \
    --log-level warn 2>"$work/etcd.log" &
pids+=($!)

for i in $(seq 0 $((NODES - 1))); do
    ns=allot-lab-node$i
    netns "$ns"
    ip link add "port$i" netns "$fabric" type veth peer name eth0 netns "$ns"
    in_ns "$fabric" ip link set "port$i" master fab0 up
    in_ns "$ns" ip addr add "10.250.0.1$i/24" dev eth0
    in_ns "$ns" ip link set eth0 up
    in_ns "$ns" sysctl -qw net.ipv4.ip_forward=1
done

cat > "$work/pools.yaml" <<YAML
apiVersion: cilium.io/v2alpha1
kind: CiliumPodIPPool
metadata:
  name: blue
spec:
  ipv4:
    cidrs: [10.210.0.0/16]
    maskSize: 24
---
apiVersion: cilium.io/v2alpha1
kind: CiliumPodIPPool
metadata:
  name: green
spec:
  ipv4:
    cidrs: [10.220.0.0/16]
    maskSize: 24
YAML
for _ in $(seq 50); do allot_cluster pool apply -f "$work/pools.yaml" >/dev/null 2>&1 && break; sleep 0.2; done
allot_cluster pool list

echo "== operator, and an agent per node (direct routes, gateway reserved)"
ip netns exec "$fabric" "$bin/allot" --etcd-endpoints "$etcd_url" operator --id lab-operator 2>"$work/operator.log" &
pids+=($!)
for i in $(seq 0 $((NODES - 1))); do
    ip netns exec "allot-lab-node$i" "$bin/allot" --etcd-endpoints "$etcd_url" agent --node "node$i" \
        --node-ip "10.250.0.1$i" --auto-direct-node-routes --reserve-gateway \
        --pre-allocation blue=0,green=0 --data-dir "$work/agent$i" --socket "$work/agent$i.sock" \
        2>"$work/agent$i.log" &
    pids+=($!)
done
for i in $(seq 0 $((NODES - 1))); do
    for _ in $(seq 100); do "$bin/allot" --socket "$work/agent$i.sock" status >/dev/null 2>&1 && break; sleep 0.1; done
done

# pod NODE POOL: a pod namespace wired by the bridge plugin inside its node (one bridge per pool:
# bridge holds one gateway per family, and each node holds one block per pool here).
declare -A pod_ip
pod() {
    local i=$1 pool=$2 name="pod-$1-$2"
    netns "allot-lab-$name"
    printf '{"cniVersion":"1.0.0","name":"lab","type":"bridge","bridge":"br-%s","isGateway":true,
      "isDefaultGateway":true,"ipam":{"type":"allot-ipam","socket":"%s"},
      "capabilities":{"io.kubernetes.cri.pod-annotations":true},
      "runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"ipam.cilium.io/ip-pool":"%s"}}}' \
        "$pool" "$work/agent$i.sock" "$pool" |
    CNI_COMMAND=ADD CNI_CONTAINERID="$name" CNI_NETNS="/var/run/netns/allot-lab-$name" CNI_IFNAME=eth0 \
        CNI_PATH="$bin:/usr/lib/cni" CNI_ARGS="IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=$name" \
        ip netns exec "allot-lab-node$i" /usr/lib/cni/bridge >/dev/null
    pod_ip[$name]=$(in_ns "allot-lab-$name" ip -4 -br addr show eth0 | awk '{print $3}' | cut -d/ -f1)
    printf '  %-14s node%s  %-6s %s\n' "$name" "$i" "$pool" "${pod_ip[$name]}"
}
echo "== pods"
for i in $(seq 0 $((NODES - 1))); do pod "$i" blue; pod "$i" green; done

sleep 1
echo "== direct routes on node0 (proto 0xa1)"
in_ns allot-lab-node0 ip route show proto 0xa1

echo "== pings across nodes"
last=$((NODES - 1))
for pair in "pod-0-blue pod-$last-blue" "pod-0-green pod-$last-green" "pod-$last-green pod-0-blue"; do
    set -- $pair
    if in_ns "allot-lab-$1" ping -c 1 -W 2 "${pod_ip[$2]}" >/dev/null; then r=ok; else r=FAILED; fi
    printf '  %-14s -> %-14s %-12s %s\n' "$1" "$2" "${pod_ip[$2]}" "$r"
done

echo "== allot --etcd-endpoints $etcd_url status"
allot_cluster status
echo "== cleaning up"
