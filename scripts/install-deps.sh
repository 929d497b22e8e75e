#!/usr/bin/env bash
# Installs the system packages Overlay's build, tests and demo need, when missing.
# Debian/Ubuntu only (apt-get); run as root. Safe to run again: it installs nothing
# when everything is there.
set -euo pipefail

declare -A pkg_for=(
  [etcd]=etcd-server
  [etcdctl]=etcd-client
  [protoc]=protobuf-compiler
  [ip]=iproute2
  [iptables]=iptables
  [nft]=nftables
  [ping]=iputils-ping
  [iperf3]=iperf3
  [vagrant]=vagrant
  [systemd-analyze]=systemd
)
# Files that are no command on PATH: the reference CNI plugins, chained after
# overlay-cni (portmap publishes ports).
declare -A pkg_for_file=(
  [/usr/lib/cni/portmap]=containernetworking-plugins
)
missing=()
for cmd in "${!pkg_for[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${pkg_for[$cmd]}")
done
for file in "${!pkg_for_file[@]}"; do
  [ -e "$file" ] || missing+=("${pkg_for_file[$file]}")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install-deps: missing packages: ${missing[*]} (run as root, or install them yourself)" >&2
    exit 1
  fi
  SUDO=(sudo env DEBIAN_FRONTEND=noninteractive)
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
