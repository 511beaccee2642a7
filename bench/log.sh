#!/usr/bin/env bash
# The log benchmark with the raw device figures beside it, in one run:
#   bench/log.sh DIR [derechofs bench log options…]
# fio measures sequential 1 MiB writes in DIR (with an fdatasync after every write, as the log's
# `fsync` policy does, and with one fsync at the end), then `derechofs bench log` runs in DIR.
set -euo pipefail
dir=${1:?usage: bench/log.sh DIR [options]}
shift
here=$(cd "$(dirname "$0")/.." && pwd)
command -v fio >/dev/null || { apt-get update -qq && apt-get install -y -qq fio >/dev/null; }
[ -x "$here/target/release/derechofs" ] || cargo build --release -p derechofs-tools --manifest-path "$here/Cargo.toml"
mkdir -p "$dir"
echo "== fio in $dir ($(df -h --output=source,fstype "$dir" | tail -1))"
for mode in "--fdatasync=1" "--end_fsync=1"; do
  out=$(timeout 120 fio --name=seqwrite --directory="$dir" --rw=write --bs=1M --size=1G \
        --ioengine=psync $mode --unlink=1 --output-format=terse --terse-version=3)
  # Field 48 of terse v3 is the write bandwidth in KiB/s.
  kib=$(echo "$out" | awk -F';' '{print $48}')
  printf "fio sequential 1 MiB writes %-14s %8.1f MiB/s\n" "$mode" "$(echo "$kib / 1024" | bc -l)"
done
echo
timeout 900 "$here/target/release/derechofs" bench log --dir "$dir/derechofs-bench" "$@"
rm -rf "$dir/derechofs-bench"
