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
if [ ! -f "$src/vagrant/pki/ca.pem" ]; then
  echo "make the certificates first: vagrant/make-pki.sh (on the host)" >&2
  exit 1
fi
install -d -m 0755 /etc/overlay/pki
install -m 0644 "$src"/vagrant/pki/ca.pem /etc/overlay/pki/
# Overlay's admin identity, for overlayctl on every VM (root only).
install -m 0644 "$src"/vagrant/pki/admin.pem /etc/overlay/pki/
install -m 0600 "$src"/vagrant/pki/admin-key.pem /etc/overlay/pki/
cat > /etc/profile.d/overlayctl.sh <<'ENV'
export OVERLAY_TLS_CERT=/etc/overlay/pki/admin.pem OVERLAY_TLS_KEY=/etc/overlay/pki/admin-key.pem OVERLAY_TLS_CA=/etc/overlay/pki/ca.pem
ENV
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq iproute2 iptables iputils-ping >/dev/null
