#!/usr/bin/env bash
# FUSE suites against a real mount:
#   scripts/fuse-tests.sh passthrough   # the FUSE passthrough of a tmpfs: validates the harness
#   scripts/fuse-tests.sh memory        # DerechoFS over in-process shards in memory (no cluster):
#                                       # the adapter and the file system logic through the kernel
#   scripts/fuse-tests.sh cluster       # DerechoFS on a 3-node cluster (`derechofs up`), plus
#                                       # `mount -t derechofs` and an fstab line through the
#                                       # mount.derechofs helper (installed as /sbin/mount.derechofs)
# Each suite prints "fuse suite NAME: ok" or "fuse suite NAME: FAILED (log: FILE)"; the last line
# is "fuse: N passed, N failed". Runs as root (mounts, switches users); needs the `derechofs`
# binary built (debug, or $DERECHOFS_BIN).
#
# Suites:
#   pjdfstest   the Rust pjdfstest, configuration tests/fuse/pjdfstest.toml (0 failures needed;
#               exclusions are listed in docs/SEMANTICS.md)
#   fsx         a bounded fsx run (FSX_OPS operations, default 10000, 2000 on the cluster; seed
#               FSX_SEED, default 1), configuration tests/fuse/fsx.toml (adds posix_fallocate and
#               hole punching to fsx's default mix)
#   mount-helper (cluster only) `mount -t derechofs`, an fstab line (`mount -T`), and a bad option
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
. "$here/scripts/lib.sh"
target=${1:?usage: scripts/fuse-tests.sh passthrough|memory|cluster}
bin=${DERECHOFS_BIN:-${CARGO_TARGET_DIR:-$here/target}/debug/derechofs}
memory_bin=$(dirname "$bin")/examples/memory_mount
fsx_ops=${FSX_OPS:-10000}
# On the cluster every operation is a replicated round trip (and the test build is unoptimized).
[ "$target" = cluster ] && fsx_ops=${FSX_OPS:-2000}
fsx_seed=${FSX_SEED:-1}
# Bounds: every suite and every wait is limited.
suite_timeout=300
mount_wait_s=20

need_apt fuse3
need_cargo_bins pjdfstest fsx
need_user tests
[ -x "$bin" ] || { echo "fuse-tests: $bin is missing: build it first" >&2; exit 2; }

W=$(mktemp -d /tmp/derechofs-fuse.XXXXXX)
# pjdfstest switches to other users, who must reach the mount point.
chmod 755 "$W"
pids=()
mounts=()
cleanup() {
  for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null; done
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
  done
  mountpoint -q "$W/src" && umount "$W/src"
  rm -rf "$W"
}
trap cleanup EXIT

is_mounted() { awk -v m="$1" '$5 == m { found = 1 } END { exit !found }' /proc/self/mountinfo; }

wait_mounted() { # wait_mounted DIR PID
  for _ in $(seq $((mount_wait_s * 10))); do
    is_mounted "$1" && return 0
    kill -0 "$2" 2>/dev/null || return 1
    sleep 0.1
  done
  return 1
}

mkdir -p "$W/src" "$W/mnt"
case "$target" in
  passthrough)
    mount -t tmpfs -o size=2g tmpfs "$W/src"
    "$bin" bench passthrough "$W/src" "$W/mnt" -o allow_other,default_permissions \
      > "$W/mount.log" 2>&1 < /dev/null &
    pids+=($!)
    ;;
  memory)
    [ -x "$memory_bin" ] || { echo "fuse-tests: $memory_bin is missing: build it first" >&2; exit 2; }
    "$memory_bin" "$W/mnt" -o allow_other > "$W/mount.log" 2>&1 < /dev/null &
    pids+=($!)
    ;;
  cluster)
    install -m 755 "$bin" /sbin/mount.derechofs
    "$bin" up --data "$W/data" "$W/mnt" -o allow_other > "$W/mount.log" 2>&1 < /dev/null &
    pids+=($!)
    ;;
  *) echo "fuse-tests: unknown target '$target'" >&2; exit 2 ;;
esac
mounts+=("$W/mnt")
if ! wait_mounted "$W/mnt" "${pids[0]}"; then
  echo "fuse-tests: the $target mount did not come up:" >&2
  cat "$W/mount.log" >&2
  echo "fuse: 0 passed, 1 failed"
  exit 1
fi

passed=0
failed=0
logs=${FUSE_LOGS:-/tmp/derechofs-fuse-logs}
mkdir -p "$logs"
result() { # result NAME STATUS
  if [ "$2" -eq 0 ]; then
    echo "fuse suite $1 ($target): ok"; passed=$((passed + 1))
  else
    echo "fuse suite $1 ($target): FAILED (log: $logs/$target-$1.log)"; failed=$((failed + 1))
  fi
}

# pjdfstest: its own exit status is 0 even with failures; the summary line decides.
pjd_config=$here/tests/fuse/pjdfstest.toml
mkdir -p "$W/mnt/pjdfstest" && chmod 1777 "$W/mnt/pjdfstest"
(cd "$W/mnt/pjdfstest" && timeout "$suite_timeout" pjdfstest -c "$pjd_config" \
  -p "$W/mnt/pjdfstest") > "$logs/$target-pjdfstest.log" 2>&1
status=$?
summary=$(grep -E '^Summary:' "$logs/$target-pjdfstest.log" | tail -1)
echo "pjdfstest ($target): ${summary:-no summary}"
if [ $status -ne 0 ] || ! echo "$summary" | grep -qE '^Summary: 0 failed'; then status=1; fi
result pjdfstest $status
rm -rf "$W/mnt/pjdfstest"

# fsx: a bounded run on one file.
mkdir -p "$W/mnt/fsx" "$W/fsx"
timeout "$suite_timeout" fsx -N "$fsx_ops" -S "$fsx_seed" -f "$here/tests/fuse/fsx.toml" \
  -P "$W/fsx" "$W/mnt/fsx/file" \
  > "$logs/$target-fsx.log" 2>&1
result fsx $?
rm -rf "$W/mnt/fsx"

if [ "$target" = cluster ]; then
  # mount(8) with the helper, from the command line and from an fstab line; each mount sees what
  # the other wrote; umount ends its daemon.
  contacts=$(sed -n 's/^listen = "\(.*\)"$/\1/p' "$W"/data/n*.toml | paste -sd,)
  echo "written through the first mount" > "$W/mnt/helper-check"
  mkdir -p "$W/mnt2" "$W/mnt3"
  mounts+=("$W/mnt2" "$W/mnt3")
  status=0
  { timeout 60 mount -t derechofs "$contacts" "$W/mnt2" -o allow_other \
      && grep -q "written through the first mount" "$W/mnt2/helper-check" \
      && echo "written through mount -t" > "$W/mnt2/helper-check2" \
      && umount "$W/mnt2" \
      && echo "$contacts $W/mnt3 derechofs noauto,allow_other 0 0" > "$W/fstab" \
      && timeout 60 mount -T "$W/fstab" "$W/mnt3" \
      && grep -q "written through mount -t" "$W/mnt3/helper-check2" \
      && umount "$W/mnt3" \
      && ! timeout 60 mount -t derechofs "$contacts" "$W/mnt2" -o bogus 2>"$W/bogus.err" \
      && grep -q "unknown mount option \`bogus\`" "$W/bogus.err"; } > "$logs/$target-mount-helper.log" 2>&1 || status=1
  result mount-helper $status
fi

echo "fuse: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
