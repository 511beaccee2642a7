#!/usr/bin/env bash
# Reads of a file at a past time through a fresh `derechofs up` mount (3 nodes, data on
# /dev/shm): writes 512 MiB of random bytes, takes the time T a second later, then reads
# `FILE@T` with `dd` in 1 MiB blocks twice, the caches dropped before each, and checks the bytes.
# A snapshot's bytes come from the members over the links (a live file's, from their log files:
# docs/ARCHITECTURE.md "Local reads"). Prints one line per read: the label, the rate, and the
# machine's busy clock ticks across it (user, nice, system, irq and softirq of every CPU, 100 per
# CPU-second). Run it alternately with two binaries to compare them.
#   bench/read-at.sh [LABEL]
# DERECHOFS_BIN=PATH: the derechofs binary (default: the release build, made first).
# Runs as root; the cluster and the mount it starts are stopped by pid (Ctrl-C to `up`), and its
# data directory and mount point are removed.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
. scripts/lib.sh
need_apt fuse3
label=${1:-run}
bench_label read-at "$label"
bin=$(bench_bin)
bench_up read-at "$bin" "$label" --local-socket-dir "/run/derechofs-read-at-$label"
mnt=$BENCH_MNT
src=$(mktemp /dev/shm/derechofs-read-at-src.XXXXXX)
trap 'rm -f "$src"; bench_stop' EXIT
busy() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8; exit}' /proc/stat; }
dd if=/dev/urandom of="$src" bs=1M count=512 status=none
dd if="$src" of="$mnt/f" bs=1M conv=fsync status=none
sleep 1
t=$(date +%s.%N | cut -c1-17)
sleep 1
for run in 1 2; do
  sync
  echo 3 > /proc/sys/vm/drop_caches
  busy_before=$(busy)
  start=$(date +%s%N)
  dd if="$mnt/f@$t" of=/dev/null bs=1M status=none
  end=$(date +%s%N)
  echo "$label read_at_MiB/s=$((512 * 1000000000 / (end - start))) busy_ticks=$(($(busy) - busy_before)) run=$run"
done
cmp -s "$src" "$mnt/f@$t" || { echo "bench/read-at.sh: f@$t differs from what was written" >&2; exit 1; }
