#!/usr/bin/env bash
# Benchmarks allot against Debian's host-local plugin and the spawn floor, in one run.
# Prints a table, writes bench-out/results.json and bench-out/latency.svg.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
require_root "the benchmark"
ensure_packages
# The binaries as scripts/install.sh builds them (allot-ipam statically linked).
scripts/install.sh --build-only
exec target/release/allot-bench "$@"
