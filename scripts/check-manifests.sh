#!/usr/bin/env bash
# Offline checks of deploy/ (no API server): renders deploy/, deploy/overlays/chained/ and the
# webhooks (deploy/webhook/, deploy/ippool-webhook/) with kubectl kustomize, validates every
# object with kubernetes-validate (Kubernetes 1.32 and the newest schemas it has, strict), the
# examples against the CRD schemas, RBAC, images and webhook wiring (scripts/check_manifests.py),
# and the scripts with bash -n and shellcheck when installed.
# Exits non-zero on any failure. Called by scripts/test.sh; needs kubectl and
# `ensure_python_packages` (scripts/lib.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v kubectl >/dev/null 2>&1; then
    echo "check-manifests: kubectl not found: install kubectl (1.27 or newer, for kustomize v5) to render deploy/" >&2
    exit 1
fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
kubectl kustomize deploy/ >"$out/deploy.yaml"
kubectl kustomize deploy/overlays/chained/ >"$out/chained.yaml"
# The standalone webhook kustomizations, and each with its cert-manager component (cert-manager's
# kinds have no schema here: that render is checked for its wiring, not validated).
rendered=("$out/deploy.yaml" "$out/chained.yaml")
cert_manager=()
for w in webhook ippool-webhook; do
    kubectl kustomize "deploy/$w/" >"$out/$w.yaml"
    rendered+=("$out/$w.yaml")
    mkdir "$out/$w-cert-manager"
    rel=$(realpath --relative-to="$out/$w-cert-manager" "deploy/$w")
    printf 'resources: [%s]\ncomponents: [%s/cert-manager]\n' "$rel" "$rel" >"$out/$w-cert-manager/kustomization.yaml"
    kubectl kustomize "$out/$w-cert-manager" >"$out/$w-cert-manager.yaml"
    cert_manager+=("$out/$w-cert-manager.yaml")
    if ! grep -q '^kind: Certificate$' "$out/$w-cert-manager.yaml"; then
        echo "check-manifests: deploy/$w with its cert-manager component renders no Certificate" >&2
        exit 1
    fi
done
# Examples must stay out of the kustomization.
if grep -q '^kind: IPPool$' "$out/deploy.yaml"; then
    echo "check-manifests: deploy/ renders an IPPool: deploy/examples/ must not be part of the kustomization" >&2
    exit 1
fi
python3 scripts/check_manifests.py deploy "${rendered[@]}" --cert-manager "${cert_manager[@]}"

for s in scripts/*.sh; do
    bash -n "$s"
done
if command -v shellcheck >/dev/null 2>&1; then
    shellcheck -S warning scripts/k8s-e2e.sh scripts/build-image.sh scripts/check-manifests.sh
    echo "check-manifests: shellcheck passed on the deploy scripts"
else
    echo "check-manifests: shellcheck not installed: bash -n only"
fi
