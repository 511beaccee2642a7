#!/usr/bin/env bash
# Sets everything up and runs the main job. Until the cluster and the mount exist, the main job is
# the persistent versioned log: its benchmark on the data directory (default ./data, or $1).
set -euo pipefail
cd "$(dirname "$0")"
. scripts/lib.sh
need_apt build-essential pkg-config fio bc
need_rust
cargo build --release -p derechofs-tools
data=${1:-./data}
exec bench/log.sh "$data"
