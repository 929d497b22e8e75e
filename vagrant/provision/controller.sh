#!/usr/bin/env bash
# The control VM: etcd (single member) and the controller, then the network config.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq etcd-server >/dev/null
systemctl disable --now etcd 2>/dev/null || true
id etcd >/dev/null 2>&1 || useradd --system --home /var/lib/overlay-etcd etcd
cat > /etc/overlay/etcd.env <<ENV
ETCD_LISTEN_CLIENT_URLS=http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=http://127.0.0.1:2379
ENV
install -m 0644 /overlay/vagrant/pki/controller.pem /etc/overlay/pki/
install -m 0600 /overlay/vagrant/pki/controller-key.pem /etc/overlay/pki/
cat > /etc/overlay/controller.env <<ENV
OVERLAY_ETCD_ENDPOINTS=http://127.0.0.1:2379
OVERLAY_LISTEN=${CONTROLLER_IP}:7400
OVERLAY_TLS_CERT=/etc/overlay/pki/controller.pem
OVERLAY_TLS_KEY=/etc/overlay/pki/controller-key.pem
OVERLAY_TLS_CA=/etc/overlay/pki/ca.pem
ENV
systemctl daemon-reload
systemctl enable --now overlay-etcd.service overlay-controller.service
. /etc/profile.d/overlayctl.sh
overlayctl --controller "https://${CONTROLLER_IP}:7400" config set \
  --network 10.244.0.0/16 --backend "${OVERLAY_BACKEND}"
overlayctl --controller "https://${CONTROLLER_IP}:7400" config show
