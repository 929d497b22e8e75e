#!/usr/bin/env bash
# Installs the Overlay binaries built in the checkout and the systemd units.
set -euo pipefail
src=/overlay
if [ ! -x "$src/target/release/overlay-agent" ]; then
  echo "build the release binaries first: make release (on the host, in the checkout)" >&2
  exit 1
fi
install -m 0755 "$src"/target/release/overlay-controller "$src"/target/release/overlay-agent \
  "$src"/target/release/overlayctl /usr/local/bin/
if [ -x "$src/target/release/overlay-cni" ]; then
  install -D -m 0755 "$src/target/release/overlay-cni" /opt/cni/bin/overlay-cni
fi
install -m 0644 "$src"/deploy/systemd/*.service /etc/systemd/system/
mkdir -p /etc/overlay
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq iproute2 iptables iputils-ping >/dev/null
