#!/usr/bin/env bash
# The migration lab (issue 12, point 4): NODES nodes as network namespaces on a bridge (as
# scripts/lab.sh builds them), etcd on that bridge, PODS pods per node first on the reference
# `bridge` + `host-local` plugins from the node's pod CIDR (routes between nodes as flannel's
# host-gw sets them). Every pod pings every other pod (same node and other nodes) every 20 ms
# from its own network namespace. Then node by node: the agent adopts host-local's leases
# (--adopt-host-local), `allot node switch` installs the new conflist, each pod restarts
# through its new CNI (DEL on the old, ADD on allot's); then `allot node cleanup --from bridge`.
# Prints, per pod, the milliseconds without replies to it during its restart and whether its
# address changed, pings lost while neither end of a pair was restarting, duplicate addresses
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
namespaces=()
declare -A ping_pid ping_log ping_to addr

# Signals a process only while it is still this shell's child: a PID that exited and was reaped
# may belong to someone else by now.
kill_child() { [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f2)" = "$$" ] && kill -TERM "$1" 2>/dev/null; }
cleanup() {
    set +e
    for pid in "${ping_pid[@]}" "${pids[@]}"; do kill_child "$pid"; done
    for pid in "${ping_pid[@]}" "${pids[@]}"; do wait "$pid" 2>/dev/null; done
    for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP
fail() { echo "migration lab: $*" >&2; exit 1; }

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
    mkdir -p "$work/n$i/net.d" "$work/n$i/cni"
done
# Pod to pod across nodes: each node routes the others' pod CIDRs to them (flannel host-gw).
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

# The pings. Every ordered pair FROM:TO has one pinger at a time: `ping` in FROM's netns to TO's
# current address, every 20 ms, each reply timestamped (-D), each unanswered ping noted when
# the next one goes (-O). A pod's restart ends every pinger of its pairs before the DEL and
# starts new ones after the ADD (the new address, the new interface), so a pinger's log spans
# only time in which neither end restarts; each log is one segment of its pair.
segments=$work/segments # one line per ended pinger: FROM TO ADDRESS END LOG
nseg=0
start_ping() { # FROM TO
    local k=$1:$2
    nseg=$((nseg + 1))
    ping_log[$k]=$work/ping-$1-$2-$nseg.log
    ping_to[$k]=${addr[$2]}
    ip netns exec "$tag-$1" ping -n -D -O -i 0.02 -W 1 "${addr[$2]}" >"${ping_log[$k]}" 2>&1 &
    ping_pid[$k]=$!
}
stop_pings() { # FROM:TO...
    local k end
    end=$(now)
    for k in "$@"; do kill_child "${ping_pid[$k]}" || true; done
    for k in "$@"; do
        wait "${ping_pid[$k]}" 2>/dev/null || true
        echo "${k%%:*} ${k##*:} ${ping_to[$k]} $end ${ping_log[$k]}" >>"$segments"
        unset "ping_pid[$k]"
    done
}
# reply_times LOG ADDRESS: the timestamps of the replies from ADDRESS, in order.
reply_times() { sed -n "s/^\[\([0-9.]*\)\] [0-9]* bytes from ${2//./\\.}: icmp_seq=.*/\1/p" "$1"; }
# wait_replies FROM:TO...: until each pinger has its first reply (10 s at most, else the route
# between them is missing).
wait_replies() {
    local deadline=$((SECONDS + 10)) k pending
    while :; do
        pending=()
        for k in "$@"; do grep -qF " from ${ping_to[$k]}: icmp_seq=" "${ping_log[$k]}" || pending+=("$k"); done
        [ ${#pending[@]} = 0 ] && return 0
        [ "$SECONDS" -lt "$deadline" ] || fail "no reply within 10 s for ${pending[*]} (FROM:TO): no route between them?"
        set -- "${pending[@]}"
        sleep 0.02
    done
}
pairs_of() { # POD: every pair with POD at one end, those to it first (their pingers start first)
    local q
    for q in "${all_pods[@]}"; do [ "$q" = "$1" ] || echo "$q:$1"; done
    for q in "${all_pods[@]}"; do [ "$q" = "$1" ] || echo "$1:$q"; done
}

declare -A ip0 ip1 gap
echo "== pods on the old CNI (bridge + host-local)"
all_pods=()
for i in $(seq 0 $((NODES - 1))); do
    for k in $(seq 0 $((PODS - 1))); do
        p=pod$i$k
        all_pods+=("$p")
        netns "$tag-$p"
        # Datagram ICMP sockets: the kernel gives each pinger its own echo id.
        in_ns "$tag-$p" sysctl -qw net.ipv4.ping_group_range="0 2147483647"
        cni "$i" ADD "$p" "$(old_conf "$i")" >/dev/null
        ip0[$p]=$(addr_of "$p")
        addr[$p]=${ip0[$p]}
        printf '  %-6s node%s  %s\n' "$p" "$i" "${ip0[$p]}"
    done
done
all_pairs=()
for p in "${all_pods[@]}"; do
    for q in "${all_pods[@]}"; do
        [ "$p" = "$q" ] && continue
        all_pairs+=("$p:$q")
        start_ping "$p" "$q"
    done
done
wait_replies "${all_pairs[@]}"
echo "  ${#all_pairs[@]} pingers (every pod to every other pod), each answered"

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
# The only pod CIDR routed to node I is 10.245.I.0/24: allot's blocks for node I must lie in it.
check_blocks() { # NODE
    local b
    b=$(ip netns exec "$fabric" "$bin/allot" --etcd-endpoints "$etcd_url" node list | awk -v n="node$1" '$1 == n {print $4}')
    echo "  node$1 holds $b"
    [ "$b" = "10.245.$1.0/24" ] || fail "node$1 holds blocks '$b', not only its routed pod CIDR 10.245.$1.0/24"
}

for i in $(seq 0 $((NODES - 1))); do
    echo "== node$i: adopt, switch, restart its pods through allot"
    "$bin/allot" --socket "$work/agent$i.sock" adopt host-local "$work/n$i/cni/oldnet" | sed 's/^/  /'
    "$bin/allot" node switch --conflist "$work/n$i/allot.conflist" --cni-conf-dir "$work/n$i/net.d" | sed "s|$work/||g; s/^/  /"
    for k in $(seq 0 $((PODS - 1))); do
        p=pod$i$k
        read -ra keys <<<"$(pairs_of "$p" | tr '\n' ' ')"
        declare -A old_log=()
        for q in "${all_pods[@]}"; do [ "$q" = "$p" ] || old_log[$q]=${ping_log[$q:$p]}; done
        stopped=$(now)
        stop_pings "${keys[@]}"
        cni "$i" DEL "$p" "$(old_conf "$i")" >/dev/null
        cni "$i" ADD "$p" "$(new_conf "$i")" >/dev/null
        ip1[$p]=$(addr_of "$p")
        addr[$p]=${ip1[$p]}
        case ${ip1[$p]} in
            10.245.$i.*) ;;
            *) fail "$p got '${ip1[$p]}' from allot, outside node$i's routed pod CIDR 10.245.$i.0/24" ;;
        esac
        restarted=$(now)
        for key in "${keys[@]}"; do start_ping "${key%%:*}" "${key##*:}"; done
        wait_replies "${keys[@]}"
        # Without replies to it: from the last reply before its pingers stopped to the first
        # after the ADD, the longest over its peers.
        gap[$p]=$(for q in "${all_pods[@]}"; do
            [ "$q" = "$p" ] || echo "$(reply_times "${old_log[$q]}" "${ip0[$p]}" | tail -n1) $(reply_times "${ping_log[$q:$p]}" "${addr[$p]}" | awk 'NR == 1')"
        done | awk '{ g = ($2 - $1) * 1000; if (g > m) m = g } END { printf "%.0f", m }')
        printf '  %s: %s -> %s, its %s pingers stopped at %s, restarted at %s, all answered\n' "$p" "${ip0[$p]}" \
            "${ip1[$p]}" "${#keys[@]}" "$(date -d "@$stopped" +%T.%3N)" "$(date -d "@$restarted" +%T.%3N)"
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
    check_blocks "$i"
done

echo "== cleanup --from bridge on every node"
leftovers=0
for i in $(seq 0 $((NODES - 1))); do
    in_ns "$tag-n$i" "$bin/allot" --socket "$work/agent$i.sock" node cleanup --from bridge --cni-conf-dir "$work/n$i/net.d" | sed "s|$work/||g; s/^/  node$i: /"
    n=$(in_ns "$tag-n$i" "$bin/allot" --socket "$work/agent$i.sock" node cleanup --from bridge --dry-run --cni-conf-dir "$work/n$i/net.d" | grep -c '^would remove' || true)
    leases=$(find "$work/n$i/cni/oldnet" -maxdepth 1 -name '10.*' | wc -l)
    # Counted apart from cleanup's own listing: any config of the old network left, moved aside or not.
    confs=$(grep -rls '"name":"oldnet"' "$work/n$i/net.d" | wc -l || true)
    leftovers=$((leftovers + n + leases + confs))
done
# Pings go on past the cleanup: what it broke shows as losses (more than the 1 s grace below).
sleep 2
stop_pings "${!ping_pid[@]}"

# seg_figures LOG ADDRESS END: "LOST REPLIES" of one segment. A ping is lost when its icmp_seq
# has no reply from ADDRESS while a later one has, or, after the last reply, when -O noted it
# unanswered more than 1 s (ping -W 1) before the pinger ended: in flight otherwise. Pings
# before the first reply belong to the restart that started the segment (its window ends at
# the first reply after the ADD).
seg_figures() {
    awk -v a="$2" -v end="$3" '
        { ts = substr($1, 2, length($1) - 2) + 0; s = $0; sub(/.*icmp_seq=/, "", s); s += 0 }
        index($0, " bytes from " a ": icmp_seq=") { if (!(s in got)) n++; got[s] = 1; if (n == 1 || s < lo) lo = s; if (s > hi) hi = s; next }
        /no answer yet for icmp_seq=/ && ts < end - 1 { late[s] = 1 }
        END {
            for (s = lo + 1; s < hi; s++) if (!(s in got)) lost++
            for (s in late) if (s + 0 > hi) lost++
            print lost + 0, n + 0
        }' "$1"
}
declare -A lost_to
replies=0
lost_total=0
while read -r _ to a end log; do
    read -r l n <<<"$(seg_figures "$log" "$a" "$end")"
    lost_to[$to]=$(( ${lost_to[$to]:-0} + l ))
    lost_total=$((lost_total + l))
    replies=$((replies + n))
done <"$segments"

echo "== figures (every pod pings every other pod every 20 ms from its own netns: ${#all_pairs[@]} pairs)"
printf '  %-6s %-13s %-13s %-8s %-22s %s\n' pod old new changed "no replies to it (ms)" "lost to it, neither end restarting"
for p in "${all_pods[@]}"; do
    changed=no; [ "${ip0[$p]}" = "${ip1[$p]}" ] || changed=yes
    printf '  %-6s %-13s %-13s %-8s %-22s %s\n' "$p" "${ip0[$p]}" "${ip1[$p]}" "$changed" "${gap[$p]}" "${lost_to[$p]:-0}"
done
echo "  pings lost while neither end of their pair was restarting: $lost_total (of $replies answered)"
echo "  duplicate addresses seen: $dups"
echo "  old leftovers after cleanup: $leftovers"
if [ "$dups" != 0 ] || [ "$leftovers" != 0 ] || [ "$lost_total" != 0 ]; then fail "a figure that must be 0 is not"; fi
