#!/usr/bin/env bash
# Sets everything up and runs the main job: `derechofs up`, a local 3-node cluster mounted at
# MOUNTPOINT (default /mnt/derechofs), in the foreground until Ctrl-C, which unmounts and stops
# the nodes. Data, configurations and logs go to ./derechofs-up (kept across runs).
#   ./up.sh [MOUNTPOINT] [derechofs up options…]
set -euo pipefail
cd "$(dirname "$0")"
. scripts/lib.sh
need_apt build-essential pkg-config fuse3
need_rust
cargo build --release -p derechofs-tools
target=${CARGO_TARGET_DIR:-target}
# mount(8)'s helper, so that `mount -t derechofs CONTACTS DIR` and fstab lines work.
install_mount_helper "$target/release/derechofs"
mountpoint=${1:-/mnt/derechofs}
[ $# -gt 0 ] && shift
mkdir -p "$mountpoint"
exec "$target/release/derechofs" up --data ./derechofs-up "$mountpoint" "$@"
