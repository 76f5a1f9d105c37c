#!/usr/bin/env bash
# Offline checks of deploy/ (no API server): renders deploy/ and deploy/overlays/chained/ with
# kubectl kustomize, validates every object with kubernetes-validate (Kubernetes 1.32 and the
# newest schemas it has, strict), the examples against the CRD schemas, RBAC and images
# (scripts/check_manifests.py), and the scripts with bash -n and shellcheck when installed.
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
# Examples must stay out of the kustomization.
if grep -q '^kind: IPPool$' "$out/deploy.yaml"; then
    echo "check-manifests: deploy/ renders an IPPool: deploy/examples/ must not be part of the kustomization" >&2
    exit 1
fi
python3 scripts/check_manifests.py deploy "$out/deploy.yaml" "$out/chained.yaml"

for s in scripts/*.sh; do
    bash -n "$s"
done
if command -v shellcheck >/dev/null 2>&1; then
    shellcheck -S warning scripts/k8s-e2e.sh scripts/build-image.sh scripts/check-manifests.sh
    echo "check-manifests: shellcheck passed on the deploy scripts"
else
    echo "check-manifests: shellcheck not installed: bash -n only"
fi
