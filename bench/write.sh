#!/usr/bin/env bash
# One sequential write through a fresh `derechofs up` mount (3 nodes, data on /dev/shm): fio
# writes a 1 GiB file in 1 MiB writes with one fsync at the end. Prints one line: the label,
# fio's bandwidth, the machine's busy clock ticks across fio (user, nice, system, irq and softirq
# of every CPU, 100 per CPU-second) and the share the host stole. Run it alternately with two
# binaries to compare them: the ticks say what a change saves when the host's speed moves.
#   bench/write.sh [LABEL]
# DERECHOFS_BIN=PATH: the derechofs binary (default: the release build, made first).
# WRITE_SIZE=SIZE: fio's --size (default 1G).
# Runs as root; the cluster and the mount it starts are stopped by pid (Ctrl-C to `up`), and its
# data directory and mount point are removed.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
. scripts/lib.sh
need_apt fuse3 fio
size=${WRITE_SIZE:-1G}
case $size in
  *[!0-9KMG]*|"") echo "bench/write.sh: WRITE_SIZE must be a size such as 512M or 1G" >&2; exit 2 ;;
esac
label=${1:-run}
bench_label write "$label"
bin=$(bench_bin)
bench_up write "$bin" "$label" --local-socket-dir "/run/derechofs-write-$label"
mnt=$BENCH_MNT
busy() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8; exit}' /proc/stat; }
ticks_before=$(stat_ticks)
busy_before=$(busy)
kib=$(fio --name=w --filename="$mnt/f" --rw=write --bs=1M --size="$size" --end_fsync=1 \
  --output-format=terse --terse-version=3 | awk -F';' '{print $48}')
busy_after=$(busy)
echo "$label write_KiB/s=$kib busy_ticks=$((busy_after - busy_before))" \
  "steal%=$(steal_pct "$ticks_before" "$(stat_ticks)")"
