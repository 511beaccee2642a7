#!/usr/bin/env bash
# Drives a 3-node cluster into versions whose file system changes would exceed the version
# budget, and checks that the nodes stay up and the replicas agree:
#
#   scripts/version-budget.sh [CLIENTS] [ROUNDS]
#
# Starts three `derechofs node` processes on 127.0.0.1 (binary: $DERECHOFS_BIN, default the debug
# build under $CARGO_TARGET_DIR or target/) with `window = 1`, `layout.chunk_size = 2097152` and
# `suspect_after_ms = 10000` (a debug build on a loaded machine can be slow to send heartbeats
# while it applies large versions; this script is not about failures; `SUSPECT_AFTER_MS=1000`
# runs it with the default, and each node logs every version whose apply held its event loop
# 100 ms or more),
# runs the `version_budget` example of derechofs-client (CLIENTS clients, default 64, ROUNDS
# rounds, default 3: one-byte writes into full chunks, each compacting a 2 MiB chunk, batched into
# one version), stops the nodes by pid, and compares the three replicas' logs (`derechofs dump`).
# Exit status 0 only if every write was applied, no node exited, and the logs are identical.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
clients=${1:-64}
rounds=${2:-3}
target=${CARGO_TARGET_DIR:-$here/target}
bin=${DERECHOFS_BIN:-$target/debug/derechofs}
(cd "$here" && cargo build -q -p derechofs-tools --bin derechofs && \
  cargo build -q -p derechofs-client --example version_budget) || exit 2
probe=$target/debug/examples/version_budget
W=$(mktemp -d /tmp/derechofs-budget.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
  done
}
trap cleanup EXIT
# Ports the kernel picks, released just before the nodes bind them.
ports=$(python3 -c 'import socket
s=[socket.socket() for _ in range(3)]
[x.bind(("127.0.0.1", 0)) for x in s]
print(" ".join(str(x.getsockname()[1]) for x in s))')
read -r p1 p2 p3 <<< "$ports"
for i in 1 2 3; do
  port_var=p$i
  cat > "$W/n$i.toml" <<EOT
node_id = $i
window = 1
suspect_after_ms = ${SUSPECT_AFTER_MS:-10000}
listen = "127.0.0.1:${!port_var}"
data_dir = "$W/data$i"
members = [
  { id = 1, addr = "127.0.0.1:$p1" },
  { id = 2, addr = "127.0.0.1:$p2" },
  { id = 3, addr = "127.0.0.1:$p3" },
]

[layout]
replicas = 3
chunk_size = 2097152
EOT
done
for i in 1 2 3; do
  "$bin" node --config "$W/n$i.toml" > "$W/node$i.log" 2>&1 &
  pids+=($!)
done
# Until every node listens (the clients then wait for the view to form).
for p in $p1 $p2 $p3; do
  for _ in $(seq 300); do (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && break; sleep 0.1; done
done
timeout 600 "$probe" "127.0.0.1:$p1,127.0.0.1:$p2,127.0.0.1:$p3" "$clients" "$rounds"
status=$?
for i in 1 2 3; do
  if ! kill -0 "${pids[$((i - 1))]}" 2>/dev/null; then
    echo "node $i exited: $(grep -h 'error' "$W/node$i.log" | tail -1)"
    status=1
  fi
done
cleanup
pids=()
for i in 1 2 3; do "$bin" dump --data-dir "$W/data$i" > "$W/dump$i.txt" 2>&1; done
if cmp -s "$W/dump1.txt" "$W/dump2.txt" && cmp -s "$W/dump1.txt" "$W/dump3.txt"; then
  echo "the three replicas' logs are identical: $(grep '^shard 1 ' "$W/dump1.txt")"
else
  echo "the replicas' logs differ (see $W)"
  status=1
fi
[ "$status" -eq 0 ] && rm -rf "$W"
exit "$status"
