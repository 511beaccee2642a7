#!/usr/bin/env bash
# Runs the whole test suite: builds every target once, then runs every test with nextest (or
# cargo test where nextest is missing), then the FUSE suites against real mounts
# (scripts/fuse-tests.sh). Prints a closing "N passed, N failed" line that counts both.
set -uo pipefail
cd "$(dirname "$0")"
. scripts/lib.sh
need_apt build-essential pkg-config
need_rust
# Each run keeps its own logs, so runs side by side do not read each other's summaries.
log=$(mktemp /tmp/derechofs-test.XXXXXX.log)
fuse_log=$(mktemp /tmp/derechofs-fuse.XXXXXX.log)
trap 'rm -f "$log" "$fuse_log"' EXIT
set -e
cargo build --workspace --all-targets
set +e
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  summary=$(grep -E '^ +Summary' "$log" | tail -1)
  passed=$(echo "$summary" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+' || echo 0)
  failed=$(echo "$summary" | grep -oE '[0-9]+ failed' | grep -oE '[0-9]+' || echo 0)
else
  cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  passed=$(grep -oE '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
  failed=$(grep -oE '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
fi
# The FUSE suites: the passthrough validates the harness, then DerechoFS over in-memory shards,
# then DerechoFS on a 3-node cluster.
for target in passthrough memory cluster; do
  scripts/fuse-tests.sh "$target" 2>&1 | tee "$fuse_log"
  fuse_status=${PIPESTATUS[0]}
  fuse_summary=$(grep -E '^fuse: [0-9]+ passed' "$fuse_log" | tail -1)
  fuse_passed=$(echo "$fuse_summary" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+' || echo 0)
  fuse_failed=$(echo "$fuse_summary" | grep -oE '[0-9]+ failed' | grep -oE '[0-9]+' || echo 1)
  [ "$status" -eq 0 ] && status=$fuse_status
  passed=$(( ${passed:-0} + ${fuse_passed:-0} ))
  failed=$(( ${failed:-0} + ${fuse_failed:-0} ))
done
echo "${passed:-0} passed, ${failed:-0} failed"
exit "$status"
