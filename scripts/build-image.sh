#!/usr/bin/env bash
# Builds allot's container image (deploy/image/Containerfile, FROM scratch) with Debian's buildah:
# allot and allot-ipam compiled statically (glibc, -C target-feature=+crt-static, as
# scripts/install.sh builds the plugin), copied into an empty image.
#   scripts/build-image.sh [IMAGE]      IMAGE default localhost/allot:<crate version>
#   OUTPUT=allot.tar scripts/build-image.sh   also writes a docker-archive (for kind load / k3s import)
#   PROFILE=debug scripts/build-image.sh      unoptimized binaries (a quick try of the image build)
# Not part of the test command. Needs buildah (apt-get install buildah) and libc6-dev (libc.a).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
image=${1:-localhost/allot:$version}
case "$image" in
    *:latest|*:) echo "build-image: give a version tag, not latest: $image" >&2; exit 1 ;;
esac
if ! command -v buildah >/dev/null 2>&1; then
    echo "build-image: buildah is not installed (Debian: apt-get install buildah); nothing was built" >&2
    exit 1
fi

# Both binaries static: the image has no libc to load. Only these two crates are built.
profile=${PROFILE:-release}
case "$profile" in
    release) release=(--release) ;;
    debug) release=() ;;
    *) echo "build-image: PROFILE must be release or debug, not $profile" >&2; exit 1 ;;
esac
build_plugin "$profile"
cargo rustc "${release[@]}" -p allot --bin allot --locked --quiet -- -C target-feature=+crt-static
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
for bin in allot allot-ipam; do
    if command -v file >/dev/null 2>&1 && ! file "target/$profile/$bin" | grep -q 'static'; then
        echo "build-image: target/$profile/$bin is not statically linked: install libc6-dev (libc.a)" >&2
        exit 1
    fi
    cp "target/$profile/$bin" "$ctx/"
    # The release profile keeps line tables (100+ MB); the image keeps symbols for backtraces only.
    if command -v strip >/dev/null 2>&1; then
        strip --strip-debug "$ctx/$bin"
    fi
done
# The binaries must run with nothing around them: an empty root, as in the image.
"$ctx/allot" --version >/dev/null

buildah build --layers=false -f deploy/image/Containerfile -t "$image" "$ctx"
echo "build-image: built $image"
buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' "$image"
if [ -n "${OUTPUT:-}" ]; then
    rm -f "$OUTPUT"
    buildah push "$image" "docker-archive:$OUTPUT:$image"
    echo "build-image: wrote $OUTPUT"
fi
