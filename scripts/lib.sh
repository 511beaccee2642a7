# Shared by up.sh and test.sh: install what is missing, quietly, and say what was installed.
need_apt() {
  local missing=()
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing: ${missing[*]}"
    if [ ! -f /var/lib/apt/lists/.derechofs-updated ]; then
      apt-get update -qq && touch /var/lib/apt/lists/.derechofs-updated
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
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

# need_user NAME: creates a system user and its group of that name when missing.
need_user() {
  id "$1" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin --user-group "$1"
}
