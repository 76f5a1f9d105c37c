#!/usr/bin/env bash
# Runs every test: unit, property, plugin contract, and end to end through the real bridge
# plugin into network namespaces (as root). Installs the Debian packages the tests need.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
require_root "the test suite"
ensure_packages
ensure_python_packages

cargo build --workspace --bins --locked

# allot-ipam must link no async runtime (ARCHITECTURE.md).
if cargo tree -p allot-ipam -e normal --prefix none | grep -qE '^(tokio|async-std|smol|futures-executor) '; then
    echo "allot-ipam depends on an async runtime:" >&2
    cargo tree -p allot-ipam -e normal -i tokio >&2 || true
    exit 1
fi

# deploy/ validated offline: kustomize renders, Kubernetes schemas, CRDs, RBAC, images, examples.
scripts/check-manifests.sh

if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast "$@"
else
    cargo test --workspace --locked --no-fail-fast "$@"
fi

# The CNI migration lab (issue 12): adopt, switch, restart, cleanup on 2 nodes x 2 pods.
scripts/migration-lab.sh
