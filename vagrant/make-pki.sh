#!/usr/bin/env bash
# Makes the cluster's CA and certificates in vagrant/pki before `vagrant up`: one for the
# controller (with its private-network address), one per node (its name is its identity),
# and one for the admin (overlayctl). The VMs get them through the synced folder.
set -euo pipefail
cd "$(dirname "$0")"
ctl=../target/release/overlayctl
[ -x "$ctl" ] || { echo "build first: make release" >&2; exit 1; }
nodes=${OVERLAY_NODES:-3}
prefix=${OVERLAY_VM_NET:-192.168.56}
if [ ! -f pki/ca.pem ]; then
  "$ctl" certs init --dir pki
fi
# Certificates already made are kept (overlayctl never overwrites without --force).
issue() {
  [ -f "pki/$1.pem" ] || "$ctl" certs issue --dir pki --name "$@"
}
issue controller --ip "$prefix.10" --dns ctl
issue admin
for i in $(seq 1 "$nodes"); do
  issue "node$i"
done
