#!/usr/bin/env bash
# A node VM: overlay-agent with Docker's default bridge on the overlay.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
node=$(hostname)
install -m 0644 "/overlay/vagrant/pki/$node.pem" /etc/overlay/pki/
install -m 0600 "/overlay/vagrant/pki/$node-key.pem" /etc/overlay/pki/
cat > /etc/overlay/agent.env <<ENV
OVERLAY_CONTROLLER=https://${CONTROLLER_IP}:7400
# The node name is the certificate's (CN=$node): the controller lets it act only for it.
OVERLAY_TLS_CERT=/etc/overlay/pki/$node.pem
OVERLAY_TLS_KEY=/etc/overlay/pki/$node-key.pem
OVERLAY_TLS_CA=/etc/overlay/pki/ca.pem
OVERLAY_PUBLIC_IP=${OVERLAY_PUBLIC_IP}
OVERLAY_BRIDGE=none
OVERLAY_IP_MASQ=true
ENV
systemctl daemon-reload
systemctl enable --now overlay-agent.service
cat /run/overlay/subnet.env
# Docker on the overlay, as with Flannel: docker0 takes the leased subnet.
apt-get install -y -qq docker.io >/dev/null
mkdir -p /etc/systemd/system/docker.service.d
install -m 0644 /overlay/deploy/systemd/docker-overlay.conf /etc/systemd/system/docker.service.d/overlay.conf
systemctl daemon-reload
systemctl restart docker
ip -4 addr show docker0
