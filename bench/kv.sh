#!/usr/bin/env bash
# The K/V benchmark with etcd beside it, in one run:
#   bench/kv.sh [--tmpfs]
# Starts a 3-member etcd as ../shared/design/PEERS.md describes (client ports 22379/22381/22383,
# peer ports 22380/22382/22384), runs the closed-loop load of bench/etcd-load on it, stops it, then
# runs the same matrix with `derechofs bench kv` (three node processes it starts and stops itself).
# Data directories are on disk (under mktemp -d) unless --tmpfs puts them under /dev/shm.
# Environment: SECONDS_PER_RUN (default 10) is the length of each run; CARGO_TARGET_DIR is honoured
# when building derechofs (default target/) and etcd-load (default bench/etcd-load/target);
# ETCD_LOAD_TARGET_DIR, when set, is etcd-load's target directory instead.
# A run during which the host stole more than STEAL_RETRY_PCT % (default 5) of the machine's CPU
# time is run again, at most STEAL_RETRIES (default 2) more times, on either system; the table
# keeps the attempt with the least stolen, and every attempt's share is listed after the table.
set -euo pipefail

tmpfs=0
for arg in "$@"; do
  case $arg in
    --tmpfs) tmpfs=1 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "kv.sh: unknown argument $arg (usage: bench/kv.sh [--tmpfs])" >&2; exit 2 ;;
  esac
done

secs=${SECONDS_PER_RUN:-10}
[[ $secs =~ ^[0-9]+$ && $secs -gt 0 ]] || { echo "kv.sh: SECONDS_PER_RUN must be a positive integer" >&2; exit 2; }
retry_pct=${STEAL_RETRY_PCT:-5}
[[ $retry_pct =~ ^[0-9]+$ && $retry_pct -le 100 ]] || { echo "kv.sh: STEAL_RETRY_PCT must be an integer from 0 to 100" >&2; exit 2; }
retries=${STEAL_RETRIES:-2}
[[ $retries =~ ^[0-9]+$ && $retries -le 10 ]] || { echo "kv.sh: STEAL_RETRIES must be an integer from 0 to 10" >&2; exit 2; }
run_limit=$((secs + 40))   # a run's own deadline plus connection set-up and request time-outs

here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/lib.sh"
derechofs_target=${CARGO_TARGET_DIR:-$here/target}
derechofs=$derechofs_target/release/derechofs
etcd_target=${ETCD_LOAD_TARGET_DIR:-${CARGO_TARGET_DIR:-$here/bench/etcd-load/target}}
etcd_load=$etcd_target/release/etcd-load

# The matrix: workload, value bytes, clients. Both systems run exactly these rows.
matrix=(
  "put 100 1"
  "put 100 64"
  "put 4096 1"
  "put 4096 64"
  "cas 100 1"
  "cas 100 64"
  "contended-cas 100 16"
)

need=()
command -v etcd >/dev/null || need+=(etcd-server)
command -v etcdctl >/dev/null || need+=(etcd-client)
command -v protoc >/dev/null || need+=(protobuf-compiler)
if [ ${#need[@]} -gt 0 ]; then
  timeout 600 apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 600 apt-get install -y -qq "${need[@]}" >/dev/null
fi

echo "== building derechofs"
CARGO_TARGET_DIR=$derechofs_target timeout 1800 cargo build --release -q \
  --manifest-path "$here/Cargo.toml" -p derechofs-tools
echo "== building bench/etcd-load"
CARGO_TARGET_DIR=$etcd_target timeout 1800 cargo build --release --locked -q \
  --manifest-path "$here/bench/etcd-load/Cargo.toml"

W=$(mktemp -d)
if [ $tmpfs = 1 ]; then
  data=$(mktemp -d /dev/shm/kvbench.XXXXXX)
  label="etcd (tmpfs)"
else
  data=$W/data
  label="etcd"
fi
mkdir -p "$W/etcd" "$data"
: > "$W/etcd/pids"
rows=$W/rows

steals=()   # "system workload value clients: N %" per attempt, printed after the table

# run_row NAME COMMAND…: runs COMMAND, which prints the row; again while the host stole more than
# $retry_pct % of the machine's time during it (at most $retries more times). The attempt with the
# least stolen goes to the table. Returns COMMAND's status if an attempt fails (its row is dropped).
run_row() {
  local name=$1 attempt pct ticks best=-1 best_pct=""
  shift
  for attempt in $(seq 0 "$retries"); do
    ticks=$(stat_ticks)
    if ! "$@" > "$W/attempt.$attempt"; then
      steals+=("$name: failed")
      return 1
    fi
    pct=$(steal_pct "$ticks" "$(stat_ticks)")
    if [ "$attempt" -eq 0 ]; then
      steals+=("$name: $pct %")
    else
      steals+=("$name (again, $((attempt + 1))): $pct %")
    fi
    if [ $best -lt 0 ] || awk -v a="$pct" -v b="$best_pct" 'BEGIN {exit !(a < b)}'; then
      best=$attempt; best_pct=$pct
    fi
    awk -v a="$pct" -v m="$retry_pct" 'BEGIN {exit !(a <= m)}' && break
    [ "$attempt" -lt "$retries" ] && echo "   (the host stole $pct % during that run: once more)" >&2
  done
  tee -a "$rows" < "$W/attempt.$best"
}

# True while the process is running (a zombie awaiting its reaping counts as exited).
alive() { [ -e "/proc/$1" ] && [ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]; }

stop_etcd() {
  [ -s "$W/etcd/pids" ] || return 0
  local pid i
  while read -r pid; do kill "$pid" 2>/dev/null || true; done < "$W/etcd/pids"
  while read -r pid; do
    for i in $(seq 100); do alive "$pid" || break; sleep 0.1; done
    if alive "$pid"; then
      echo "etcd pid $pid did not stop within 10 s; sending SIGKILL" >&2
      kill -9 "$pid" 2>/dev/null || true
      for i in $(seq 50); do alive "$pid" || break; sleep 0.1; done
    fi
    wait "$pid" 2>/dev/null || true
  done < "$W/etcd/pids"
  : > "$W/etcd/pids"
}

cleanup() {
  stop_etcd
  rm -rf "$W"
  [ $tmpfs = 1 ] && rm -rf "$data"
  return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for port in 22379 22380 22381 22382 22383 22384; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "kv.sh: port $port is already in use; stop whatever listens there first" >&2
    exit 1
  fi
done

echo "== starting a 3-member etcd ($(etcd --version | head -1)), data in $data"
for i in 1 2 3; do
  c=$((22377 + 2 * i)); p=$((22378 + 2 * i)); mkdir -p "$data/d$i"
  setsid etcd --name "e$i" --data-dir "$data/d$i" \
    --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
    --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
    --initial-cluster e1=http://127.0.0.1:22380,e2=http://127.0.0.1:22382,e3=http://127.0.0.1:22384 \
    --initial-cluster-token bench --initial-cluster-state new --logger zap --log-level warn \
    > "$W/etcd/e$i.log" 2>&1 < /dev/null &
  echo $! >> "$W/etcd/pids"
done
endpoints=127.0.0.1:22379,127.0.0.1:22381,127.0.0.1:22383

healthy=0
for _ in $(seq 60); do
  if ETCDCTL_API=3 timeout 10 etcdctl --endpoints="$endpoints" --command-timeout=2s \
       endpoint health >/dev/null 2>&1; then
    healthy=1; break
  fi
  sleep 0.5
done
if [ $healthy = 0 ]; then
  echo "kv.sh: etcd did not become healthy within 30 s; its logs:" >&2
  tail -n 20 "$W"/etcd/e*.log >&2
  exit 1
fi
ETCDCTL_API=3 timeout 10 etcdctl --endpoints="$endpoints" endpoint status -w table

echo "== etcd: ${secs} s per run"
printf '| system | workload | value | clients | ops/s | p50 ms | p99 ms |\n|---|---|---|---:|---:|---:|---:|\n' \
  | tee "$rows"
# etcd_row WORKLOAD VALUE CLIENTS: one etcd-load run; the row to stdout, its details (failed
# compares, errors) to stderr after it.
etcd_row() {
  local status=0
  timeout "$run_limit" "$etcd_load" --endpoints "$endpoints" --system "$label" \
    --workload "$1" --value-bytes "$2" --clients "$3" --seconds "$secs" 2> "$W/stderr" || status=$?
  cat "$W/stderr" >&2
  return $status
}
for row in "${matrix[@]}"; do
  read -r workload value clients <<< "$row"
  if ! run_row "etcd $workload $value B x$clients" etcd_row "$workload" "$value" "$clients"; then
    echo "kv.sh: etcd-load $workload $value B x$clients failed" >&2
  fi
done
stop_etcd

# run_derechofs: the same matrix on DerechoFS with `derechofs bench kv`, which starts three
# `derechofs node` processes on loopback under --dir (persistence.policy = "fsync": a write is
# acknowledged once fsynced on all three replicas), runs the load and stops them by pid. Its flags
# mirror etcd-load's and it prints the same table row format, so its rows join the etcd rows.
# derechofs_row DIR WORKLOAD VALUE CLIENTS: one run on a fresh cluster under DIR.
derechofs_row() {
  rm -rf "$1"
  timeout "$run_limit" "$derechofs" bench kv --dir "$1" --workload "$2" \
    --value-bytes "$3" --clients "$4" --seconds "$secs"
}
run_derechofs() {
  local row workload value clients failed=0 dir=$data/derechofs
  echo "== derechofs: ${secs} s per run, data in $dir"
  for row in "${matrix[@]}"; do
    read -r workload value clients <<< "$row"
    if ! run_row "derechofs $workload $value B x$clients" \
           derechofs_row "$dir" "$workload" "$value" "$clients"; then
      echo "kv.sh: derechofs bench kv $workload $value B x$clients failed; node logs:" >&2
      tail -n 20 "$dir"/node*.log >&2 || true
      failed=1
    fi
  done
  rm -rf "$dir"
  return $failed
}
status=0
run_derechofs || status=1

echo
echo "== results"
cat "$rows"
echo
echo "Stolen by the host during each attempt, % of the machine's CPU time (the table keeps the least):"
printf '  %s\n' "${steals[@]}"
exit $status
