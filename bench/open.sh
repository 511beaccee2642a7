#!/usr/bin/env bash
# The latency of an open (and close) of one file through a `derechofs up` mount, data on
# /dev/shm: 8 s of back-to-back opens while the cluster is idle, then 8 s while a 2 GiB write
# with fsync runs on the same mount. Every open is a barrier read at a member (close-to-open),
# which the member answers only while it holds its read lease; this shows what that costs.
#   bench/open.sh [LABEL]
# DERECHOFS_BIN=PATH: the derechofs binary (default: the release build, made first).
# Runs as root; the cluster and the mount it starts are stopped by pid (Ctrl-C to `up`), and its
# data directory and mount point are removed.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
. scripts/lib.sh
need_apt fuse3 python3
label=${1:-run}
bench_label open "$label"
bin=$(bench_bin)
bench_up open "$bin" "$label"
mnt=$BENCH_MNT
echo hello >"$mnt/f"
measure() {
  python3 - "$mnt/f" "$1" <<'PY'
import os, sys, time
path, phase = sys.argv[1], sys.argv[2]
lat = []
end = time.time() + 8
while time.time() < end:
    t = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    os.close(fd)
    lat.append((time.perf_counter() - t) * 1e3)
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))]
print(f"| {phase} | {len(lat)} | {q(0.5):.3f} | {q(0.99):.3f} | {q(0.999):.3f} | {lat[-1]:.3f} |")
PY
}
steal_before=$(stat_ticks)
echo "| phase | opens | p50 ms | p99 ms | p99.9 ms | max ms |"
echo "|---|---:|---:|---:|---:|---:|"
measure idle
dd if=/dev/zero of="$mnt/big" bs=1M count=2048 conv=fsync status=none &
dd_pid=$!
sleep 0.5
measure "under a write"
wait "$dd_pid"
echo "host stole $(steal_pct "$steal_before" "$(stat_ticks)") % of the CPU time"
