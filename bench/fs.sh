#!/usr/bin/env bash
# The file system benchmark of issue 5, every system in one run, one table:
#   bench/fs.sh [--quick]
# The same fio jobs and the same metadata test on each target, one after the other:
#   tmpfs, disk                  the limits (no FUSE, no replication)
#   passthrough(tmpfs)           the cost of FUSE itself (derechofs bench passthrough)
#   glusterfs-disk, -tmpfs       GlusterFS replica 3, FUSE, bricks on the disk / on tmpfs
#   derechofs-memory             DerechoFS over in-process shards in memory: one process, no
#                                replicas, no network (mount/examples/memory_mount.rs)
#   derechofs-disk, -tmpfs       DerechoFS, 3 nodes (derechofs up), data on the disk / on tmpfs;
#                                printed as pending while `derechofs up` is absent; the nodes and
#                                the mount link over Unix-domain sockets (`up`'s default)
#   derechofs-tmpfs-tcp          the same as derechofs-tmpfs with every link over loopback TCP
#                                (`up --local-socket-dir ""`), as GlusterFS's bricks are reached
# Jobs: fio 1 MiB sequential write with one fsync at the end; 1 MiB sequential read of it after
# dropping the caches; 4 KiB random reads, 1 and 4 jobs (O_DIRECT where the target allows it,
# marked * where it does not); then `derechofs bench files`: create, stat and remove 10,000
# empty files. Then fs/examples/versions.rs: stat and 1 MiB read at @T against the live file, for
# a file with 100,000 versions, and against a file written once (in-process shards).
# --quick: small sizes and short runs, to check the script (numbers are not comparable).
# FS_BENCH_TARGETS="NAME NAME…": run only these targets (names as above; default: all of them),
#   e.g. FS_BENCH_TARGETS="glusterfs-tmpfs derechofs-tmpfs" for a quick A/B of one pair.
# FS_BENCH_WARM_GIB=N: GiB of memory touched before each write job (default 8; see warm_memory).
# Before every target: sync, wait for the dirty data to be written back, drop the caches; each
# target's data is removed once it is done. After the table: the CPU time the target's own
# processes spent per MiB of the write job (tells a slow system from a starved one), and the
# share of the machine's CPU time the host stole during each write job and the whole run (this
# virtual machine's speed moves by up to 2x within an hour; a run with much stolen time says so).
# DERECHOFS_BIN=PATH: the derechofs binary to run (default: the release build, made first);
#   its directory's examples/ must hold memory_mount and versions for those targets.
# STEAL_RETRY_PCT (default 5), STEAL_RETRIES (default 2): a write job during which the host stole
#   more than that share of the machine's CPU time is run again (the file removed, the caches
#   settled), at most that many more times; the table keeps the attempt with the least stolen and
#   every attempt's share is listed after it.
# Runs as root. Everything it starts is stopped by pid; every mount it makes is unmounted.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
. scripts/lib.sh

quick=0
[ "${1:-}" = "--quick" ] && quick=1
if [ $quick -eq 1 ]; then
  size=64M; runtime=2; files=1000; versions=5000
else
  size=1G; runtime=10; files=10000; versions=100000
fi
retry_pct=${STEAL_RETRY_PCT:-5}
[[ $retry_pct =~ ^[0-9]+$ && $retry_pct -le 100 ]] || { echo "fs.sh: STEAL_RETRY_PCT must be an integer from 0 to 100" >&2; exit 2; }
retries=${STEAL_RETRIES:-2}
[[ $retries =~ ^[0-9]+$ && $retries -le 10 ]] || { echo "fs.sh: STEAL_RETRIES must be an integer from 0 to 10" >&2; exit 2; }
# Bounds on every step.
job_timeout=300
mount_wait_s=30
settle_wait_s=60
settle_dirty_mib=64

need_apt fio bc fuse3 glusterfs-server glusterfs-client
if [ -n "${DERECHOFS_BIN:-}" ]; then
  bin=$DERECHOFS_BIN
else
  need_rust
  cargo build --release -q -p derechofs-tools -p derechofs-mount -p derechofs-fs --examples --bins
  bin=${CARGO_TARGET_DIR:-$here/target}/release/derechofs
fi
memory_bin=$(dirname "$bin")/examples/memory_mount
versions_bin=$(dirname "$bin")/examples/versions
# want NAME: whether target NAME is to run (FS_BENCH_TARGETS).
want() { [ -z "${FS_BENCH_TARGETS:-}" ] || [[ " $FS_BENCH_TARGETS " == *" $1 "* ]]; }

# On the disk ($FS_BENCH_DIR, default /var/tmp), not in /tmp, which may be tmpfs elsewhere.
W=$(mktemp -d "${FS_BENCH_DIR:-/var/tmp}/derechofs-fs-bench.XXXXXX")
chmod 755 "$W"
pids=()
mounts=()
gluster_pid=""
cleanup() {
  set +e
  rm -f /dev/shm/derechofs-bench-warm
  for m in "${mounts[@]}"; do
    mountpoint -q "$m" && { umount "$m" 2>/dev/null || umount -l "$m"; }
  done
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
  done
  if [ -n "$gluster_pid" ]; then
    for v in gvdisk gvtmpfs; do
      gluster --mode=script volume stop "$v" force >/dev/null 2>&1
      gluster --mode=script volume delete "$v" >/dev/null 2>&1
    done
    # glusterd, then the brick, self-heal and client daemons it started, by the pids in their
    # pid files.
    kill -TERM "$gluster_pid" 2>/dev/null
    for f in $(find /var/run/gluster /run/gluster -name '*.pid' 2>/dev/null); do
      p=$(cat "$f" 2>/dev/null)
      [ -n "$p" ] && grep -q gluster "/proc/$p/cmdline" 2>/dev/null && kill -TERM "$p"
    done
  fi
  for m in "$W/tmpfs" "$W/pt-src" "$W/gl-tmpfs" "$W/dfs-tmpfs"; do
    mountpoint -q "$m" && umount "$m"
  done
  rm -rf "$W"
}
trap cleanup EXIT

is_mounted() { awk -v m="$1" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo; }
wait_mounted() { # DIR PID
  for _ in $(seq $((mount_wait_s * 10))); do
    is_mounted "$1" && return 0
    [ -n "$2" ] && ! kill -0 "$2" 2>/dev/null && return 1
    sleep 0.1
  done
  return 1
}
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }
# warm_memory: writes and removes FS_BENCH_WARM_GIB (default 8) GiB on /dev/shm, so that the
# memory the next job takes has been touched lately. On this kind of virtual machine, memory the
# guest freed and left idle for some seconds goes back to the host, and its first touch afterwards
# costs ~40 µs a page (`dd` to /dev/shm: ~1.2-1.5 GB/s on touched memory, ~0.1-0.4 GB/s on
# untouched); a job that fills tmpfs with three replicas would measure that, not the software.
# Done before every target's write job, so every target starts alike. 0 turns it off.
# Never more than the memory available less 4 GiB (it is all memory: too much would wake the
# out-of-memory killer).
warm_memory() {
  local gib=${FS_BENCH_WARM_GIB:-8} avail
  avail=$(awk '/^MemAvailable:/ {print int($2 / 1048576)}' /proc/meminfo)
  [ "$gib" -le $((avail - 4)) ] || gib=$((avail - 4))
  [ "$gib" -gt 0 ] || return 0
  dd if=/dev/zero of=/dev/shm/derechofs-bench-warm bs=1M count=$((gib * 1024)) status=none || true
  rm -f /dev/shm/derechofs-bench-warm
}
mib() { echo "scale=1; $1 / 1024" | bc; }
# settle: what one target leaves behind is not carried into the next: its dirty data written
# back (bounded wait), then the page cache dropped. Called before every target.
settle() {
  local kib
  sync
  for _ in $(seq $((settle_wait_s * 10))); do
    kib=$(awk '/^(Dirty|Writeback):/ {s += $2} END {print s}' /proc/meminfo)
    [ "$kib" -le $((settle_dirty_mib * 1024)) ] && break
    sleep 0.1
  done
  echo 3 > /proc/sys/vm/drop_caches
}
# cpu_ticks: user+system clock ticks used so far by the processes whose command line names $W
# (the target's servers, bricks, nodes and mounts; not fio, nor the kernel's own work for
# tmpfs and the disk).
cpu_ticks() {
  local t=0 p v
  for p in $(grep -l -a -F "$W" /proc/[0-9]*/cmdline 2>/dev/null | cut -d/ -f3); do
    v=$(awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null) || continue
    t=$((t + ${v:-0}))
  done
  echo "$t"
}

run_start=$(stat_ticks)

# fio_terse DIR ARGS…: one terse v3 line; a fio that fails is reported (unless FIO_PROBE=1).
fio_terse() {
  local dir=$1 out; shift
  if ! out=$(timeout "$job_timeout" fio --name=job --filename="$dir/fio.dat" --size="$size" \
               --ioengine=psync --output-format=terse --terse-version=3 "$@" 2>"$W/fio.err"); then
    if [ "${FIO_PROBE:-0}" != 1 ]; then
      echo "fs.sh: fio $* on $dir failed:" >&2
      cat "$W/fio.err" >&2
    fi
    return 1
  fi
  echo "$out" | tail -1
}

declare -A R   # R[target,job] = number
declare -A CPU # CPU[target] = ms of CPU of its processes per MiB of the write job
declare -A STEAL # STEAL[target] = % of the machine's ticks the host took during the write job
declare -A JOB_STEAL # JOB_STEAL[target] = "read N %, ..." for the jobs after the write (not run again)
write_steals=() # "target: N %" for every attempt of a write job
targets=()
# run_jobs NAME DIR
run_jobs() {
  local name=$1 dir=$2 out direct=1 mark=""
  targets+=("$name")
  echo "== $name ($dir)" >&2
  settle
  # Terse v3: field 48 is the write bandwidth (KiB/s), 7 the read bandwidth, 8 the read IOPS.
  local c0 c1 kib s0 attempt pct
  for attempt in $(seq 0 "$retries"); do
    if [ "$attempt" -gt 0 ]; then
      echo "   (the host stole $pct % during the write: once more)" >&2
      rm -f "$dir/fio.dat"
      settle
    fi
    warm_memory
    c0=$(cpu_ticks)
    s0=$(stat_ticks)
    out=$(fio_terse "$dir" --rw=write --bs=1M --end_fsync=1)
    c1=$(cpu_ticks)
    pct=$(steal_pct "$s0" "$(stat_ticks)")
    if [ "$attempt" -eq 0 ]; then
      write_steals+=("$name: $pct %")
    else
      write_steals+=("$name (again, $((attempt + 1))): $pct %")
    fi
    # The attempt with the least stolen is kept.
    if [ "$attempt" -eq 0 ] || awk -v a="$pct" -v b="${STEAL[$name]}" 'BEGIN {exit !(a < b)}'; then
      STEAL[$name]=$pct
      R[$name,write]=$(mib "$(echo "$out" | cut -d';' -f48)")
      # Terse v3 field 47: KiB written. CPU of the target's processes per MiB written.
      kib=$(echo "$out" | cut -d';' -f47)
      unset "CPU[$name]"
      if [[ "$kib" =~ ^[0-9]+$ ]] && [ "$kib" -gt 0 ]; then
        CPU[$name]=$(echo "scale=2; ($c1 - $c0) * 1000 / $(getconf CLK_TCK) / ($kib / 1024)" | bc)
      fi
    fi
    awk -v a="$pct" -v m="$retry_pct" 'BEGIN {exit !(a <= m)}' && break
  done
  drop_caches
  s0=$(stat_ticks)
  out=$(fio_terse "$dir" --rw=read --bs=1M)
  R[$name,read]=$(mib "$(echo "$out" | cut -d';' -f7)")
  JOB_STEAL[$name]="read $(steal_pct "$s0" "$(stat_ticks)") %"
  if ! FIO_PROBE=1 fio_terse "$dir" --rw=randread --bs=4k --direct=1 --runtime=1 --time_based >/dev/null \
       || grep -qi 'error\|invalid' "$W/fio.err"; then
    direct=0; mark="*"
  fi
  for jobs in 1 4; do
    drop_caches
    s0=$(stat_ticks)
    out=$(fio_terse "$dir" --rw=randread --bs=4k --direct=$direct --runtime="$runtime" \
          --time_based --numjobs=$jobs --group_reporting)
    R[$name,rand$jobs]="$(echo "$out" | cut -d';' -f8)$mark"
    JOB_STEAL[$name]+=", 4k rand ${jobs}j $(steal_pct "$s0" "$(stat_ticks)") %"
  done
  rm -f "$dir/fio.dat"
  s0=$(stat_ticks)
  out=$(timeout "$job_timeout" "$bin" bench files "$dir" --count "$files")
  JOB_STEAL[$name]+=", files $(steal_pct "$s0" "$(stat_ticks)") %"
  for k in create stat unlink; do
    R[$name,$k]=$(echo "$out" | grep -oE "${k}_per_s=[0-9]+" | cut -d= -f2)
  done
}

pending() {
  targets+=("$1")
  for j in write read rand1 rand4 create stat unlink; do R[$1,$j]="pending"; done
}

# --- the limits
mkdir -p "$W/tmpfs" "$W/disk"
mount -t tmpfs -o size=4g tmpfs "$W/tmpfs"
want tmpfs && run_jobs tmpfs "$W/tmpfs"
want disk && run_jobs disk "$W/disk"

# --- the cost of FUSE
if want "passthrough(tmpfs)"; then
mkdir -p "$W/pt-src" "$W/pt"
mount -t tmpfs -o size=4g tmpfs "$W/pt-src"
"$bin" bench passthrough "$W/pt-src" "$W/pt" -o allow_other,default_permissions \
  > "$W/pt.log" 2>&1 < /dev/null &
pids+=($!); mounts+=("$W/pt")
wait_mounted "$W/pt" $! || { cat "$W/pt.log" >&2; exit 1; }
run_jobs "passthrough(tmpfs)" "$W/pt"
umount "$W/pt"
fi

# --- GlusterFS replica 3
if want glusterfs-disk || want glusterfs-tmpfs; then
H=$(hostname)
mkdir -p "$W/gl" "$W/gl-tmpfs"
mount -t tmpfs -o size=6g tmpfs "$W/gl-tmpfs"
setsid glusterd -N -p "$W/gl/glusterd.pid" --log-level WARNING -l "$W/gl/glusterd.log" \
  > /dev/null 2>&1 < /dev/null &
gluster_pid=$!
for _ in $(seq 100); do gluster --mode=script volume list >/dev/null 2>&1 && break; sleep 0.2; done
for kind in disk tmpfs; do
  want "glusterfs-$kind" || continue
  if [ $kind = disk ]; then b=$W/gl/$kind; else b=$W/gl-tmpfs; fi
  mkdir -p "$b/b1" "$b/b2" "$b/b3" "$W/gl-mnt-$kind"
  gluster --mode=script volume create gv$kind replica 3 "$H:$b/b1" "$H:$b/b2" "$H:$b/b3" force >/dev/null
  gluster --mode=script volume start gv$kind >/dev/null
  mount -t glusterfs "$H:/gv$kind" "$W/gl-mnt-$kind"
  mounts+=("$W/gl-mnt-$kind")
  run_jobs "glusterfs-$kind" "$W/gl-mnt-$kind"
  umount "$W/gl-mnt-$kind"
  gluster --mode=script volume stop gv$kind force >/dev/null
  gluster --mode=script volume delete gv$kind >/dev/null
  rm -rf "$b/b1" "$b/b2" "$b/b3"
done
fi

# --- DerechoFS
if want derechofs-memory; then
mkdir -p "$W/dm"
"$memory_bin" "$W/dm" -o allow_other > "$W/dm.log" 2>&1 < /dev/null &
pids+=($!); mounts+=("$W/dm")
wait_mounted "$W/dm" $! || { cat "$W/dm.log" >&2; exit 1; }
run_jobs derechofs-memory "$W/dm"
umount "$W/dm"
fi

if "$bin" up --help >/dev/null 2>&1; then
  mkdir -p "$W/dfs-tmpfs"
  # Room for every attempt of the write job: removing fio's file frees nothing here (the
  # versions stay, readable at a past time), and each attempt writes the file on three replicas.
  mount -t tmpfs -o size=$((3 * (retries + 1) + 3))g tmpfs "$W/dfs-tmpfs"
  for kind in disk tmpfs tmpfs-tcp; do
    want "derechofs-$kind" || continue
    if [ $kind = disk ]; then d=$W/dfs-data; else d=$W/dfs-tmpfs/data; fi
    # tmpfs-tcp: every link over loopback TCP, none over the local sockets.
    links=()
    if [ $kind = tmpfs-tcp ]; then links=(--local-socket-dir ""); fi
    mkdir -p "$W/dfs-mnt-$kind"
    "$bin" up --nodes 3 --data "$d" "${links[@]}" "$W/dfs-mnt-$kind" > "$W/dfs-$kind.log" 2>&1 < /dev/null &
    up=$!
    pids+=($up); mounts+=("$W/dfs-mnt-$kind")
    wait_mounted "$W/dfs-mnt-$kind" $up || { cat "$W/dfs-$kind.log" >&2; exit 1; }
    run_jobs "derechofs-$kind" "$W/dfs-mnt-$kind"
    kill -TERM $up; wait $up || true
    # Its logs are not the next target's business (on the disk they stayed in the page cache).
    rm -rf "$d"
  done
else
  pending derechofs-disk
  pending derechofs-tmpfs
  pending derechofs-tmpfs-tcp
fi

# --- the table
echo
echo "bench/fs.sh $([ $quick -eq 1 ] && echo '--quick ')on $(nproc) cores, $(date -u +%Y-%m-%dT%H:%MZ), load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "file $size; random reads ${runtime}s each; $files files; * = buffered (no O_DIRECT there)"
printf "| %-20s | %10s | %10s | %10s | %10s | %10s | %10s | %10s |\n" target "write MiB/s" "read MiB/s" "4k rand 1j" "4k rand 4j" "create/s" "stat/s" "unlink/s"
printf "|%s|\n" "----------------------|------------|------------|------------|------------|------------|------------|------------"
for t in "${targets[@]}"; do
  printf "| %-20s | %10s | %10s | %10s | %10s | %10s | %10s | %10s |\n" "$t" \
    "${R[$t,write]}" "${R[$t,read]}" "${R[$t,rand1]}" "${R[$t,rand4]}" \
    "${R[$t,create]}" "${R[$t,stat]}" "${R[$t,unlink]}"
done

# Ratios: DerechoFS over GlusterFS, same data placement; and sequential write on the disk
# against the limit of three replicas sharing one disk (disk bandwidth / 3).
ratio() { # A B
  local a=${1%\*} b=${2%\*}
  if [[ "$a" =~ ^[0-9.]+$ && "$b" =~ ^[0-9.]+$ ]] && [ "$(echo "$b > 0" | bc)" = 1 ]; then
    echo "scale=2; $a / $b" | bc
  else
    echo "n/a"
  fi
}
echo
printf "| %-38s | %8s | %8s | %8s | %8s | %8s | %8s | %8s |\n" ratio write read "rand 1j" "rand 4j" create stat unlink
for pair in "derechofs-tmpfs glusterfs-tmpfs" "derechofs-tmpfs-tcp glusterfs-tmpfs" "derechofs-disk glusterfs-disk" \
            "derechofs-memory glusterfs-tmpfs" "passthrough(tmpfs) tmpfs" "derechofs-memory passthrough(tmpfs)"; do
  set -- $pair
  printf "| %-38s |" "$1 / $2"
  for j in write read rand1 rand4 create stat unlink; do
    printf " %8s |" "$(ratio "${R[$1,$j]:-}" "${R[$2,$j]:-}")"
  done
  echo
done
echo
echo -n "CPU of each target's processes during the write job, ms per MiB:"
for t in "${targets[@]}"; do
  [ -n "${CPU[$t]:-}" ] && echo -n " $t ${CPU[$t]};"
done
echo
echo -n "Stolen by the host during the write job, % of the machine's CPU time:"
for t in "${targets[@]}"; do
  [ -n "${STEAL[$t]:-}" ] && echo -n " $t ${STEAL[$t]};"
done
echo " whole run $(steal_pct "$run_start" "$(stat_ticks)")"
if [ ${#write_steals[@]} -gt ${#STEAL[@]} ]; then
  echo "Write jobs run again (stolen during each attempt; the table keeps the least):"
  printf '  %s\n' "${write_steals[@]}"
fi
echo "Stolen by the host during the other jobs (run once each), % of the machine's CPU time:"
for t in "${targets[@]}"; do
  [ -n "${JOB_STEAL[$t]:-}" ] && echo "  $t: ${JOB_STEAL[$t]}"
done
if [ -n "${R[disk,write]:-}" ]; then
  third=$(echo "scale=1; ${R[disk,write]} / 3" | bc)
  echo "sequential write limit of 3 replicas on one disk (disk / 3): $third MiB/s;" \
    "derechofs-disk: ${R[derechofs-disk,write]:-} MiB/s (ratio $(ratio "${R[derechofs-disk,write]:-}" "$third"))"
fi

if [ -z "${FS_BENCH_TARGETS:-}" ]; then
  echo
  echo "== reads at a time (fs/examples/versions.rs $versions)"
  # With the allocator settings the derechofs process sets at start (tools/src/alloc.rs,
  # keep_freed_memory: freed MiB buffers reused, not unmapped): without them glibc's default
  # maps every 1 MiB read buffer afresh and each read pays 256 page faults, which measures
  # the allocator, not the file system (1 MiB read 615 µs instead of 31).
  GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456 \
    timeout "$job_timeout" "$versions_bin" "$versions"
fi
