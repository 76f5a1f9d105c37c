#!/usr/bin/env bash
# End to end on a real Kubernetes cluster (kind or k3s on your machine; NOT run in this
# project's CI, which has no Kubernetes): builds the image, loads it into the cluster, applies
# deploy/, waits for the agents and the operator, applies two pools from deploy/examples/, runs a
# pod in each pool (by annotation), checks each pod's IP is inside its pool's CIDRs, deletes the
# pods, checks the agents freed the addresses, and removes everything it applied.
#
#   CLUSTER=kind scripts/k8s-e2e.sh   # default: creates the kind cluster allot-e2e (no default
#                                     # CNI, 1 control plane + 2 workers) and deletes it at the end
#   CLUSTER=kind KIND_CLUSTER=mine KEEP_CLUSTER=1 scripts/k8s-e2e.sh   # an existing kind cluster
#   CLUSTER=k3s scripts/k8s-e2e.sh    # the current kubectl context is a k3s started with
#                                     # --flannel-backend=none --disable-network-policy, whose
#                                     # CNI bin dir has ptp; run on the k3s server (ctr import)
# Needs kubectl, buildah (scripts/build-image.sh), and kind or k3s. Leaves nothing applied.
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${CLUSTER:-kind}
KIND_CLUSTER=${KIND_CLUSTER:-allot-e2e}
NS=allot-e2e
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
IMAGE=localhost/allot:$version
TIMEOUT=${TIMEOUT:-180s}
work=$(mktemp -d)
created_cluster=0

log() { echo "k8s-e2e: $*" >&2; }
fail() { log "FAIL: $*"; exit 1; }

cleanup() {
    local rc=$?
    set +e
    if [ "$rc" != 0 ]; then
        log "state at failure:"
        kubectl get pods -A -o wide >&2
        kubectl -n allot-system logs -l app.kubernetes.io/name=allot-agent --tail=50 --all-containers >&2
        kubectl -n allot-system logs -l app.kubernetes.io/name=allot-operator --tail=50 >&2
    fi
    kubectl delete namespace "$NS" --ignore-not-found --wait=true >/dev/null 2>&1
    kubectl delete -f deploy/examples/pools.yaml --ignore-not-found >/dev/null 2>&1
    kubectl delete -k deploy/ --ignore-not-found --wait=true >/dev/null 2>&1
    if [ "$created_cluster" = 1 ] && [ -z "${KEEP_CLUSTER:-}" ]; then
        kind delete cluster --name "$KIND_CLUSTER" >/dev/null 2>&1
    fi
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT

for tool in kubectl buildah python3; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool is not installed"
done

# 1. Cluster and image.
case "$CLUSTER" in
    kind)
        command -v kind >/dev/null 2>&1 || fail "kind is not installed"
        if ! kind get clusters 2>/dev/null | grep -qx "$KIND_CLUSTER"; then
            cat >"$work/kind.yaml" <<'KIND'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
networking:
  disableDefaultCNI: true
  podSubnet: 10.10.0.0/16
nodes:
  - role: control-plane
  - role: worker
  - role: worker
KIND
            log "creating kind cluster $KIND_CLUSTER (no default CNI)"
            kind create cluster --name "$KIND_CLUSTER" --config "$work/kind.yaml" --wait 0s
            created_cluster=1
        fi
        kubectl config use-context "kind-$KIND_CLUSTER" >/dev/null
        OUTPUT="$work/allot.tar" scripts/build-image.sh "$IMAGE"
        kind load image-archive "$work/allot.tar" --name "$KIND_CLUSTER"
        ;;
    k3s)
        command -v k3s >/dev/null 2>&1 || fail "k3s is not installed here (run this on the k3s server)"
        OUTPUT="$work/allot.tar" scripts/build-image.sh "$IMAGE"
        k3s ctr images import "$work/allot.tar"
        ;;
    *) fail "CLUSTER must be kind or k3s, not $CLUSTER" ;;
esac

# 2. allot itself. k3s keeps its CNI directories elsewhere: patch the host paths.
target=deploy/
if [ "$CLUSTER" = k3s ]; then
    mkdir -p "$work/k3s"
    cp -r deploy "$work/k3s/deploy"
    cat >"$work/k3s/kustomization.yaml" <<'K3S'
resources: [deploy]
patches:
  - patch: |-
      apiVersion: apps/v1
      kind: DaemonSet
      metadata: {name: allot-agent, namespace: allot-system}
      spec:
        template:
          spec:
            volumes:
              - {name: cni-bin, hostPath: {path: /var/lib/rancher/k3s/data/current/bin}}
              - {name: cni-conf, hostPath: {path: /var/lib/rancher/k3s/agent/etc/cni/net.d}}
K3S
    target=$work/k3s
fi
log "applying $target"
kubectl apply -k "$target" >/dev/null
kubectl wait --for=condition=Established crd/ippools.allot.dev crd/ipblocks.allot.dev crd/allotnodes.allot.dev --timeout="$TIMEOUT" >/dev/null
kubectl -n allot-system rollout status daemonset/allot-agent --timeout="$TIMEOUT"
kubectl -n allot-system wait --for=condition=Available deployment/allot-operator --timeout="$TIMEOUT"

# 3. Two pools, and a pod in each (pool chosen by the pod annotation).
kubectl apply -f deploy/examples/pools.yaml >/dev/null
kubectl create namespace "$NS" >/dev/null
for pool in default green-pool; do
    kubectl -n "$NS" apply -f - >/dev/null <<POD
apiVersion: v1
kind: Pod
metadata:
  name: pod-$pool
  annotations: {ipam.cilium.io/ip-pool: $pool}
spec:
  containers:
    - name: pause
      image: registry.k8s.io/pause:3.10
POD
done
kubectl -n "$NS" wait --for=condition=Ready pod/pod-default pod/pod-green-pool --timeout="$TIMEOUT"

# 4. Each pod's addresses are inside its pool's CIDRs.
in_pool() { # ip pool
    local cidrs
    cidrs=$(kubectl get ippool "$2" -o jsonpath='{.spec.ipv4.cidrs[*]} {.spec.ipv6.cidrs[*]}')
    python3 - "$1" "$cidrs" <<'PY'
import ipaddress, sys
ip = ipaddress.ip_address(sys.argv[1])
sys.exit(0 if any(ip in ipaddress.ip_network(c) for c in sys.argv[2].split()) else 1)
PY
}
declare -A node_of
for pool in default green-pool; do
    ips=$(kubectl -n "$NS" get pod "pod-$pool" -o jsonpath='{.status.podIPs[*].ip}')
    [ -n "$ips" ] || fail "pod-$pool has no IP"
    for ip in $ips; do
        in_pool "$ip" "$pool" || fail "pod-$pool has $ip, outside pool $pool"
        log "pod-$pool: $ip is in pool $pool"
    done
    node_of[$pool]=$(kubectl -n "$NS" get pod "pod-$pool" -o jsonpath='{.spec.nodeName}')
done
[ -n "$(kubectl get ipblocks -l allot.dev/pool=green-pool -o name)" ] || fail "no IPBlock of green-pool was granted"

# The agent on a node answers for that node's allocations.
allocations() { # node -> JSON list
    local agent
    agent=$(kubectl -n allot-system get pod -l app.kubernetes.io/name=allot-agent \
        --field-selector "spec.nodeName=$1" -o jsonpath='{.items[0].metadata.name}')
    kubectl -n allot-system exec "$agent" -c agent -- /usr/local/bin/allot allocations list -o json
}
holds() { # node pod: whether that node's agent holds an address for the pod
    local out
    out=$(allocations "$1") || fail "allot allocations list on $1 failed"
    grep -q "\"$2\"" <<<"$out"
}
for pool in default green-pool; do
    holds "${node_of[$pool]}" "pod-$pool" || fail "the agent on ${node_of[$pool]} does not list pod-$pool"
done

# 5. Deleting the pods frees their addresses.
kubectl -n "$NS" delete pod pod-default pod-green-pool --wait=true >/dev/null
for pool in default green-pool; do
    for _ in $(seq 30); do
        holds "${node_of[$pool]}" "pod-$pool" || continue 2
        sleep 1
    done
    fail "pod-$pool's allocation is still held 30 s after the pod was deleted"
done
log "allocations freed"
log "PASS"
