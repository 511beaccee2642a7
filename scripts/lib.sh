# Shared by up.sh, test.sh, scripts/fuse-tests.sh and the bench/ scripts: install what is
# missing, quietly, and say what was installed. Runs side by side (a CI run and a local one) are
# safe: apt waits for the other's lock, and the mount helper is replaced atomically.
need_apt() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    if [ ! -f /var/lib/apt/lists/.derechofs-updated ]; then
      apt-get -o DPkg::Lock::Timeout=300 update -qq && touch /var/lib/apt/lists/.derechofs-updated
    fi
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y -qq \
      "${missing[@]}" >/dev/null
  fi
}

need_rust() {
  if ! command -v cargo >/dev/null; then
    echo "cargo is missing: install the Rust toolchain (rustup, Rust ≥ 1.85) first" >&2
    exit 1
  fi
  for comp in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$comp" || rustup component add "$comp" >/dev/null 2>&1 || true
  done
}

# need_cargo_bins BIN…: installs the crates of the same names with `cargo install` when missing.
need_cargo_bins() {
  export PATH="$HOME/.cargo/bin:$PATH"
  local missing=() bin
  for bin in "$@"; do
    command -v "$bin" >/dev/null || missing+=("$bin")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]} (cargo install)"
    cargo install --locked -q "${missing[@]}"
  fi
}

# need_user NAME: creates a system user and its group of that name when missing (a run beside
# this one may be creating it at the same moment: then useradd fails, and the user appears).
need_user() {
  local _
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    id "$1" >/dev/null 2>&1 && return 0
    useradd --system --no-create-home --shell /usr/sbin/nologin --user-group "$1" 2>/dev/null \
      && return 0
    sleep 1
  done
  echo "could not create the user $1" >&2
  return 1
}

# install_mount_helper BIN: installs BIN as mount(8)'s helper /sbin/mount.derechofs. Nothing is
# written when the helper there is already BIN's bytes; otherwise BIN is copied to a temporary
# name beside it and renamed over it, so mount(8), or another run installing at the same moment,
# sees the old helper or the new one, never a partial file (the last rename wins). The temporary
# name is in MOUNT_HELPER_TMP meanwhile, for a trap to remove.
MOUNT_HELPER_TMP=
install_mount_helper() {
  local bin=$1 dest=/sbin/mount.derechofs status
  cmp -s "$bin" "$dest" && return 0
  MOUNT_HELPER_TMP=$(mktemp /sbin/.mount.derechofs.XXXXXX) || return 1
  install -m 755 "$bin" "$MOUNT_HELPER_TMP" && mv -f "$MOUNT_HELPER_TMP" "$dest"
  status=$?
  rm -f "$MOUNT_HELPER_TMP"
  MOUNT_HELPER_TMP=
  return $status
}

# stat_ticks: the machine's total and stolen clock ticks so far (/proc/stat's first line: every
# column summed, and `steal`, the time the host ran something else while this guest wanted a
# CPU). The benchmarks report the stolen share: this virtual machine's speed moves by up to 2x
# within an hour, and a run with much stolen time says so.
stat_ticks() { awk '/^cpu / {t = 0; for (i = 2; i <= NF; i++) t += $i; print t, $9; exit}' /proc/stat; }

# steal_pct "T0 S0" "T1 S1": the stolen share of the ticks between two stat_ticks readings, in %.
steal_pct() {
  local t0 s0 t1 s1
  read -r t0 s0 <<< "$1"; read -r t1 s1 <<< "$2"
  awk -v s=$((s1 - s0)) -v t=$((t1 - t0)) 'BEGIN {printf "%.1f", (t > 0 ? 100 * s / t : 0)}'
}

# bench_bin: the derechofs binary a benchmark measures: $DERECHOFS_BIN, or the release build of
# this tree (built first). Prints its path.
bench_bin() {
  if [ -n "${DERECHOFS_BIN:-}" ]; then
    echo "$DERECHOFS_BIN"
  else
    need_rust
    cargo build --release -q -p derechofs-tools >&2
    echo "${CARGO_TARGET_DIR:-$PWD/target}/release/derechofs"
  fi
}

# bench_label SCRIPT LABEL: exits (status 2) unless LABEL is letters, digits, - or _.
bench_label() {
  case $2 in
    *[!A-Za-z0-9_-]*|"") echo "bench/$1.sh: LABEL must be letters, digits, - or _" >&2; exit 2 ;;
  esac
}

# bench_up SCRIPT BIN LABEL [UP OPTION…]: starts `BIN up` on /dev/shm/derechofs-SCRIPT-LABEL,
# mounted at /mnt/derechofs-SCRIPT-LABEL (in BENCH_MNT), and waits for the mount; its pid is in
# BENCH_UP_PID, and an EXIT trap stops it (Ctrl-C to `up`) and removes its data and mount point.
bench_up() {
  local script=$1 bin=$2 label=$3 _
  shift 3
  bench_label "$script" "$label"
  BENCH_DIR=/dev/shm/derechofs-$script-$label
  BENCH_MNT=/mnt/derechofs-$script-$label
  BENCH_LOG=$(mktemp "/tmp/derechofs-$script.XXXXXX.log")
  rm -rf "$BENCH_DIR"
  mkdir -p "$BENCH_MNT"
  "$bin" up --data "$BENCH_DIR" "$@" "$BENCH_MNT" >"$BENCH_LOG" 2>&1 &
  BENCH_UP_PID=$!
  trap bench_stop EXIT
  for _ in $(seq 1 300); do mountpoint -q "$BENCH_MNT" && break; sleep 0.1; done
  if ! mountpoint -q "$BENCH_MNT"; then
    echo "bench/$script.sh: the mount did not come up; its log:" >&2
    cat "$BENCH_LOG" >&2
    exit 1
  fi
}

bench_stop() {
  kill -INT "$BENCH_UP_PID" 2>/dev/null || true
  wait "$BENCH_UP_PID" 2>/dev/null || true
  rm -rf "$BENCH_DIR" "$BENCH_LOG"
  rmdir "$BENCH_MNT" 2>/dev/null || true
}
