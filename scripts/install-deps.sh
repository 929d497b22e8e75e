#!/usr/bin/env bash
# Installs the system packages Overlay's build, tests and demo need, when missing.
#
# Target: a minimal Debian 12 (or Ubuntu 22.04/24.04 with universe) that has the Rust
# toolchain and nothing else. `make check-fresh` proves this list in a clean root made by
# mmdebstrap --variant=minbase: a package missing here fails that check.
#
# Each need is checked by what it provides (a command or a file), not by the package
# name, so a machine that got etcd or protoc another way installs nothing. Safe to run
# again: it installs nothing when everything is there. Root, or sudo.
set -euo pipefail

# What                       how it is checked              Debian package
needs=(
  # the build: a C compiler and libc headers (ring, the linker), protoc and the
  # well-known .proto files (etcd-client's build script imports descriptor.proto;
  # --no-install-recommends does not bring them with protobuf-compiler)
  "cmd:cc                                                   gcc"
  "file:/usr/include/stdio.h                                libc6-dev"
  "cmd:make                                                 make"
  "cmd:protoc                                               protobuf-compiler"
  "file:/usr/include/google/protobuf/descriptor.proto       libprotobuf-dev"
  "file:/etc/ssl/certs/ca-certificates.crt                  ca-certificates"
  # the tests and the demo: a real etcd, the kernel's tools in namespaces
  "cmd:etcd                                                 etcd-server"
  "cmd:etcdctl                                              etcd-client"
  "cmd:ip                                                   iproute2"
  "cmd:bridge                                               iproute2"
  "cmd:iptables                                             iptables"
  "cmd:nft                                                  nftables"
  "cmd:ping                                                 iputils-ping"
  "cmd:iperf3                                               iperf3"
  "cmd:setpriv                                              util-linux"
  "cmd:nsenter                                              util-linux"
  # the reference CNI plugins, chained after overlay-cni (portmap publishes ports)
  "file:/usr/lib/cni/portmap                                containernetworking-plugins"
  # the deployment checks: systemd units and the Vagrantfile
  "cmd:systemd-analyze                                      systemd"
  "cmd:vagrant                                              vagrant"
  # the clean-room check (scripts/check-fresh.sh)
  "cmd:mmdebstrap                                           mmdebstrap"
)

missing=()
for line in "${needs[@]}"; do
  read -r probe pkg <<<"$line"
  kind=${probe%%:*}
  what=${probe#*:}
  case $kind in
    cmd) command -v "$what" >/dev/null 2>&1 && continue ;;
    file) [ -e "$what" ] && continue ;;
  esac
  case " ${missing[*]-} " in *" $pkg "*) ;; *) missing+=("$pkg") ;; esac
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
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$log" 2>&1; then
  echo "install-deps: apt-get install failed; its last lines:" >&2
  tail -n 20 "$log" >&2
  exit 1
fi
