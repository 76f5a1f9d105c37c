#!/usr/bin/env bash
# Benchmarks allot against Debian's host-local plugin and the spawn floor, in one run.
# Prints a table, writes bench-out/results.json and bench-out/latency.svg.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
require_root "the benchmark"
ensure_packages
cargo build --release --workspace --bins --locked --quiet
# The plugin as it would be installed: statically linked, so each exec skips the dynamic loader.
cargo rustc --release -p allot-ipam --bin allot-ipam --locked --quiet -- -C target-feature=+crt-static
exec target/release/allot-bench "$@"
