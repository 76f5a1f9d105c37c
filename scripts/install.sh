#!/usr/bin/env bash
# Builds allot (release) and the static allot-ipam plugin, and installs them:
#   allot      -> $PREFIX/bin      (PREFIX default /usr/local)
#   allot-ipam -> $CNI_BIN_DIR     (default /opt/cni/bin, where runtimes look for plugins)
# --build-only builds into target/release and installs nothing. DESTDIR is honoured.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
PREFIX=${PREFIX:-/usr/local}
CNI_BIN_DIR=${CNI_BIN_DIR:-/opt/cni/bin}
DESTDIR=${DESTDIR:-}

cargo build --release --workspace --bins --locked --quiet
build_plugin release
if command -v file >/dev/null && ! file target/release/allot-ipam | grep -q static; then
    echo "target/release/allot-ipam is not statically linked: install libc6-dev (libc.a)" >&2
    exit 1
fi
[ "${1:-}" = --build-only ] && exit 0

install -D -m 0755 target/release/allot "$DESTDIR$PREFIX/bin/allot"
install -D -m 0755 target/release/allot-ipam "$DESTDIR$CNI_BIN_DIR/allot-ipam"
echo "installed $DESTDIR$PREFIX/bin/allot and $DESTDIR$CNI_BIN_DIR/allot-ipam (static)"
