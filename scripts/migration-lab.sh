#!/usr/bin/env bash
# The migration lab (issue 12, point 4): NODES nodes as network namespaces on a bridge (as
# scripts/lab.sh builds them), etcd on that bridge, PODS pods per node first on the reference
# `bridge` + `host-local` plugins from the node's pod CIDR (routes between nodes as flannel's
# host-gw sets them). Every pod is pinged every 20 ms from the node network. Then node by node:
# the agent adopts host-local's leases (--adopt-host-local), `allot node switch` installs the
# new conflist, each pod restarts through its new CNI (DEL on the old, ADD on allot's); then
# `allot node cleanup --from bridge`. Prints, per pod, the milliseconds without replies and
# whether its address changed, pings lost outside the pod's own restart, duplicate addresses
# seen, and old leftovers after cleanup. Exits non-zero when a must-be-zero figure is not.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
require_root "the migration lab"
ensure_packages
cargo build -p allot -p allot-ipam --bins --locked --quiet

NODES=${NODES:-2}
PODS=${PODS:-2}
bin=$PWD/target/debug
work=$(mktemp -d /tmp/allot-miglab.XXXXXX)
tag=mig$$
fabric=$tag-fab
etcd_url=http://10.251.0.1:2379
pids=()
pingers=()
namespaces=()

cleanup() {
    set +e
    for pid in "${pingers[@]}" "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
    for pid in "${pingers[@]}" "${pids[@]}"; do wait "$pid" 2>/dev/null; done
    for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null; done
    rm -rf "$work"
}
trap cleanup EXIT

netns() { ip netns add "$1"; namespaces+=("$1"); ip netns exec "$1" ip link set lo up; }
in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
now() { date +%s.%N; }

echo "== fabric 10.251.0.0/24, etcd, $NODES nodes (pod CIDR 10.245.<node>.0/24 each)"
netns "$fabric"
in_ns "$fabric" ip link add fab0 type bridge
in_ns "$fabric" ip addr add 10.251.0.1/24 dev fab0
in_ns "$fabric" ip link set fab0 up
ip netns exec "$fabric" etcd --name lab --data-dir "$work/etcd" --listen-client-urls "$etcd_url" \
    --advertise-client-urls "$etcd_url" --listen-peer-urls http://10.251.0.1:2380 \
    --initial-advertise-peer-urls http://10.251.0.1:2380 --initial-cluster lab=http://10.251.0.1:2380 \
    --log-level warn 2>"$work/etcd.log" &
pids+=($!)
for i in $(seq 0 $((NODES - 1))); do
    ns=$tag-n$i
    netns "$ns"
    ip link add "$tag-p$i" netns "$fabric" type veth peer name eth0 netns "$ns"
    in_ns "$fabric" ip link set "$tag-p$i" master fab0 up
    in_ns "$ns" ip addr add "10.251.0.1$i/24" dev eth0
    in_ns "$ns" ip link set eth0 up
    in_ns "$ns" sysctl -qw net.ipv4.ip_forward=1
    in_ns "$fabric" ip route add "10.245.$i.0/24" via "10.251.0.1$i"
    mkdir -p "$work/n$i/net.d" "$work/n$i/cni"
done
for i in $(seq 0 $((NODES - 1))); do
    for j in $(seq 0 $((NODES - 1))); do
        [ "$i" = "$j" ] || in_ns "$tag-n$i" ip route add "10.245.$j.0/24" via "10.251.0.1$j"
    done
done

# The old CNI: bridge + host-local on the node's pod CIDR, its conflist in the node's net.d.
old_conf() {
    printf '{"cniVersion":"1.0.0","name":"oldnet","type":"bridge","bridge":"cni0","isGateway":true,"isDefaultGateway":true,
      "ipam":{"type":"host-local","ranges":[[{"subnet":"10.245.%s.0/24"}]],"dataDir":"%s"}}' "$1" "$work/n$1/cni"
}
new_conf() {
    printf '{"cniVersion":"1.0.0","name":"podnet","type":"bridge","bridge":"cni0","isGateway":true,"isDefaultGateway":true,
      "ipam":{"type":"allot-ipam","socket":"%s"}}' "$work/agent$1.sock"
}
for i in $(seq 0 $((NODES - 1))); do
    printf '{"cniVersion":"1.0.0","name":"oldnet","plugins":[%s]}\n' "$(old_conf "$i" | tr -d '\n')" > "$work/n$i/net.d/10-oldnet.conflist"
    printf '{"cniVersion":"1.0.0","name":"podnet","plugins":[{"type":"bridge","bridge":"cni0","isGateway":true,"isDefaultGateway":true,"ipam":{"type":"allot-ipam","socket":"%s"}}]}\n' \
        "$work/agent$i.sock" > "$work/n$i/allot.conflist"
done

# cni NODE COMMAND POD CONFIG: one CNI call inside the node, as its runtime makes it.
cni() {
    echo "$4" | CNI_COMMAND=$2 CNI_CONTAINERID=$3 CNI_NETNS=/var/run/netns/$tag-$3 CNI_IFNAME=eth0 \
        CNI_PATH="$bin:/usr/lib/cni" ip netns exec "$tag-n$1" /usr/lib/cni/bridge
}
addr_of() { in_ns "$tag-$1" ip -4 -br addr show eth0 2>/dev/null | awk '{print $3}' | cut -d/ -f1; }

declare -A ip0 ip1 t0 t1 pinger
start_pinger() { # POD ADDR LOG
    ip netns exec "$fabric" ping -n -D -i 0.02 -W 1 "$2" >"$3" 2>/dev/null &
    pinger[$1]=$!
    pingers+=($!)
}
echo "== pods on the old CNI (bridge + host-local)"
all_pods=()
for i in $(seq 0 $((NODES - 1))); do
    for k in $(seq 0 $((PODS - 1))); do
        p=pod$i$k
        all_pods+=("$p")
        netns "$tag-$p"
        cni "$i" ADD "$p" "$(old_conf "$i")" >/dev/null
        ip0[$p]=$(addr_of "$p")
        printf '  %-6s node%s  %s\n' "$p" "$i" "${ip0[$p]}"
        start_pinger "$p" "${ip0[$p]}" "$work/ping-$p-0.log"
    done
done

echo "== etcd, pool mig (10.245.0.0/16, blocks /24), an agent per node adopting host-local's directory"
for _ in $(seq 50); do
    ip netns exec "$fabric" "$bin/allot" --etcd-endpoints "$etcd_url" pool list >/dev/null 2>&1 && break
    sleep 0.2
done
for i in $(seq 0 $((NODES - 1))); do
    ip netns exec "$tag-n$i" "$bin/allot" --etcd-endpoints "$etcd_url" agent --node "node$i" \
        --node-ip "10.251.0.1$i" --pool "mig=10.245.0.0/16@24" --default-pool mig --pre-allocation mig=0 \
        --adopt-host-local "$work/n$i/cni/oldnet" --data-dir "$work/agent$i" --socket "$work/agent$i.sock" \
        2>"$work/agent$i.log" &
    pids+=($!)
done
for i in $(seq 0 $((NODES - 1))); do
    # Adopted at start: no ADD is served on the node before that.
    for _ in $(seq 200); do
        [ "$("$bin/allot" --socket "$work/agent$i.sock" allocations list 2>/dev/null | grep -c adopted:host-local)" = "$PODS" ] && break
        sleep 0.1
    done
    echo "  node$i: $("$bin/allot" --socket "$work/agent$i.sock" allocations list | grep -c adopted:host-local) host-local leases adopted at start"
done
sleep 1

dups=0
count_dups() {
    local d
    d=$(for p in "${all_pods[@]}"; do addr_of "$p"; done | grep . | sort | uniq -d | wc -l)
    dups=$((dups + d))
}

for i in $(seq 0 $((NODES - 1))); do
    echo "== node$i: adopt, switch, restart its pods through allot"
    "$bin/allot" --socket "$work/agent$i.sock" adopt host-local "$work/n$i/cni/oldnet" | sed 's/^/  /'
    "$bin/allot" node switch --conflist "$work/n$i/allot.conflist" --cni-conf-dir "$work/n$i/net.d" | sed "s|$work/||g; s/^/  /"
    for k in $(seq 0 $((PODS - 1))); do
        p=pod$i$k
        t0[$p]=$(now)
        cni "$i" DEL "$p" "$(old_conf "$i")" >/dev/null
        cni "$i" ADD "$p" "$(new_conf "$i")" >/dev/null
        t1[$p]=$(now)
        ip1[$p]=$(addr_of "$p")
        kill "${pinger[$p]}" 2>/dev/null || true
        start_pinger "$p" "${ip1[$p]}" "$work/ping-$p-1.log"
        count_dups
        sleep 0.5
    done
    # The agent frees an adopted address at its next rescan (every 2 s) after host-local's DEL
    # removed the lease file: wait for that, as an operator would, before listing and cleanup.
    for _ in $(seq 100); do
        [ "$("$bin/allot" --socket "$work/agent$i.sock" allocations list 2>/dev/null | grep -c adopted:host-local)" = 0 ] && break
        sleep 0.1
    done
    "$bin/allot" --socket "$work/agent$i.sock" allocations list | sed 's/^/  /'
done

echo "== cleanup --from bridge on every node"
leftovers=0
for i in $(seq 0 $((NODES - 1))); do
    in_ns "$tag-n$i" "$bin/allot" --socket "$work/agent$i.sock" node cleanup --from bridge --cni-conf-dir "$work/n$i/net.d" | sed "s|$work/||g; s/^/  node$i: /"
    n=$(in_ns "$tag-n$i" "$bin/allot" --socket "$work/agent$i.sock" node cleanup --from bridge --dry-run --cni-conf-dir "$work/n$i/net.d" | grep -c '^would remove' || true)
    leases=$(find "$work/n$i/cni/oldnet" -maxdepth 1 -name '10.*' | wc -l)
    leftovers=$((leftovers + n + leases))
done
sleep 0.5
for p in "${all_pods[@]}"; do kill "${pinger[$p]}" 2>/dev/null || true; done

# reply timestamps and icmp_seq: "[ts] 64 bytes from A: icmp_seq=N ..."
replies() { sed -n 's/^\[\([0-9.]*\)\].*icmp_seq=\([0-9]*\).*/\1 \2/p' "$1"; }
# lost LOG FROM TO: sequence numbers missing between replies within [FROM, TO].
lost() { replies "$1" | awk -v a="$2" -v b="$3" '$1>=a && $1<=b { if (seen && $2>prev+1) n+=$2-prev-1; prev=$2; seen=1 } END { print n+0 }'; }

echo "== figures (pings every 20 ms from the node network to every pod)"
printf '  %-6s %-13s %-13s %-8s %-16s %s\n' pod old new changed "no replies (ms)" "lost outside its restart"
end=$(now)
bad=0
for p in "${all_pods[@]}"; do
    last=$(replies "$work/ping-$p-0.log" | awk -v t="${t0[$p]}" '$1<t {x=$1} END {print x}')
    first=$(replies "$work/ping-$p-1.log" | awk 'NR==1 {print $1}')
    gap=$(awk -v a="${last:-0}" -v b="${first:-0}" 'BEGIN { if (a==0 || b==0) print "none"; else printf "%.0f", (b-a)*1000 }')
    other=$(( $(lost "$work/ping-$p-0.log" 0 "${t0[$p]}") + $(lost "$work/ping-$p-1.log" "${t1[$p]}" "$end") ))
    changed=no; [ "${ip0[$p]}" = "${ip1[$p]}" ] || changed=yes
    printf '  %-6s %-13s %-13s %-8s %-16s %s\n' "$p" "${ip0[$p]}" "${ip1[$p]}" "$changed" "$gap" "$other"
    [ "$gap" != none ] || bad=1
    [ "$other" = 0 ] || bad=1
done
echo "  duplicate addresses seen: $dups"
echo "  old leftovers after cleanup: $leftovers"
[ "$dups" = 0 ] && [ "$leftovers" = 0 ] && [ "$bad" = 0 ] || { echo "migration lab: a figure that must be 0 is not" >&2; exit 1; }
