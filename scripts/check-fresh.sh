#!/usr/bin/env bash
# The clean-room check: does the README's install path work on a machine that has the Rust
# toolchain and nothing else? A green `make test` here proves little about that, since this
# machine has whatever was installed on it by hand.
#
# In a minimal Debian 12 root (mmdebstrap --variant=minbase), with this checkout copied in
# and this machine's Rust toolchain bind-mounted read-only, it runs:
#   1. scripts/install-deps.sh   (must install everything below needs)
#   2. a build of every binary   (cargo build --workspace --bins --offline)
#   3. the deploy tests          (systemd units, env examples, Vagrantfile)
#   4. scripts/install-deps.sh again (must install nothing)
# Crates come from this machine's cargo registry (read-only; `cargo fetch` first), so the
# check needs no crates.io and the build inside sees only what install-deps put there.
# Packages come from the Debian mirror in this machine's apt sources, through its own apt
# proxy settings, resolv.conf and hosts file.
#
# A failure names the step, its first error line and its whole log. Root; the mounts live
# in a private mount namespace and vanish with it. `make check-fresh` runs it alone,
# `.ci/run` after `make test`. KEEP_FRESH_ROOT=1 keeps the root for a look afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

say() { echo "check-fresh: $*" >&2; }
die() { say "$*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "needs root (chroot, mounts)"
command -v mmdebstrap >/dev/null || die "mmdebstrap is missing (scripts/install-deps.sh installs it)"
command -v unshare >/dev/null || die "unshare is missing (util-linux)"

cargo_home=${CARGO_HOME:-$HOME/.cargo}
# The toolchain in use (rustup's active one, or a standalone install): its sysroot holds
# cargo, rustc and the standard library, and is what the root gets, read-only.
sysroot=$(rustc --print sysroot 2>/dev/null) || die "rustc is not on PATH"
[ -x "$sysroot/bin/cargo" ] && [ -x "$sysroot/bin/rustc" ] ||
  die "no cargo and rustc in the toolchain's sysroot $sysroot"
[ "$sysroot" != /usr ] || die "rustc is the distribution's (/usr): the clean root must not see it"

work=$repo/target/check-fresh
root=$work/root
logs=$work/logs
rm -rf "$work"
mkdir -p "$root" "$logs"
cleanup() {
  if [ "${KEEP_FRESH_ROOT:-0}" != 1 ]; then rm -rf "$root"; fi
}
trap cleanup EXIT

# Runs step NAME: COMMAND..., its output in $logs/NAME.log; on failure names the step, the
# first line that looks like an error, and the log.
step() {
  local name=$1
  shift
  local log=$logs/$name.log started=$SECONDS
  say "[$name] ..."
  if "$@" >"$log" 2>&1; then
    say "[$name] ok ($((SECONDS - started)) s)"
    return 0
  fi
  local first
  # The first line that says "error:" (cargo, rustc, apt's "E:"), and the first that names
  # what is missing or failed (a build script's panic carries protoc's message).
  first=$({
    grep -m1 -E '(^|[[:space:]])(error(\[E[0-9]+\])?:|E:|fatal:)|panicked at|FAILED' "$log"
    grep -m1 -E 'File not found|No such file|not found|Unable to locate' "$log"
  } | cut -c1-300 || true)
  say "FAILED at step '$name' after $((SECONDS - started)) s"
  say "first error:"
  echo "${first:-(none recognised; see the log)}" | sed 's/^/    /' >&2
  say "last lines of $log:"
  tail -n 15 "$log" | sed 's/^/    /' >&2
  exit 1
}

# The Debian mirror(s) this machine's apt uses, as a sources file mmdebstrap reads: a
# deb822 `.sources` file that names Debian, else the `deb` lines of the one-line files.
sources=$work/sources.list
: >"$sources"
for f in /etc/apt/sources.list.d/*.sources; do
  if [ -f "$f" ] && grep -qE '^[^#]*debian' "$f"; then
    sources=$work/debian.sources
    cp "$f" "$sources"
    break
  fi
done
if [ "$sources" = "$work/sources.list" ]; then
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] && { grep -E '^deb ' "$f" | grep debian >>"$sources" || true; }
  done
fi
[ -s "$sources" ] || die "no Debian apt source found on this machine"
aptopts=()
while read -r opt; do aptopts+=(--aptopt="$opt"); done < <(apt-config dump | grep -iE '^Acquire::(https?|ftp)::Proxy' || true)

step root mmdebstrap --variant=minbase --include=ca-certificates \
  "${aptopts[@]}" bookworm "$root" "$sources"

# What the root needs to reach the same package servers as this machine.
cp /etc/resolv.conf /etc/hosts "$root/etc/" 2>/dev/null || true
cp -r /etc/apt/apt.conf.d/. "$root/etc/apt/apt.conf.d/" 2>/dev/null || true

# The checkout as a clean clone has it (tracked and untracked-not-ignored files).
mkdir -p "$root/src"
git ls-files -z --cached --others --exclude-standard |
  (cd "$repo" && xargs -0 tar -cf - --no-recursion 2>/dev/null) | tar -xf - -C "$root/src"

# Crates for the offline build: fetched here, read-only there.
step fetch cargo fetch --locked

mkdir -p "$root/toolchain" "$root/cargo-registry" "$root/cargo"
inside() {
  unshare --mount --propagation private -- bash -c '
    set -e
    root=$1; sysroot=$2; cargo_home=$3; shift 3
    mount --bind "$sysroot" "$root/toolchain"
    mount -o remount,bind,ro "$root/toolchain"
    mount --bind "$cargo_home/registry" "$root/cargo-registry"
    mount -o remount,bind,ro "$root/cargo-registry"
    mount -t proc proc "$root/proc"
    mount --rbind /dev "$root/dev"
    mount -t tmpfs tmpfs "$root/tmp"
    mount -t tmpfs tmpfs "$root/run"
    exec chroot "$root" /usr/bin/env -i \
      HOME=/root PATH=/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      CARGO_HOME=/cargo \
      CARGO_TARGET_DIR=/src/target LANG=C.UTF-8 OVERLAY_TEST_STRICT=1 \
      bash -c "cd /src && $*"
  ' inside "$root" "$sysroot" "$cargo_home" "$@"
}
# cargo and rustc from the toolchain itself (no rustup proxy inside); the registry where
# cargo looks for it.
mkdir -p "$root/cargo/bin"
for tool in cargo rustc rustdoc; do
  ln -s /toolchain/bin/$tool "$root/cargo/bin/$tool"
done
ln -s /cargo-registry "$root/cargo/registry"

step install-deps inside scripts/install-deps.sh
step build inside cargo build --workspace --bins --locked --offline
step deploy-tests inside cargo test --locked --offline -p overlay-tests --test deploy
step install-deps-again inside 'out=$(scripts/install-deps.sh 2>&1); [ -z "$out" ] || { echo "error: a second run installed: $out"; exit 1; }'
say "passed in $SECONDS s (logs in $logs)"
