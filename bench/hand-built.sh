#!/usr/bin/env bash
# The baseline of the datapath throughput benchmark (docs/benchmarks.md, `make bench-datapath`):
# two hosts and one workload per host, wired by hand with `ip` and `bridge` the way Flannel's
# vxlan and host-gw backends wire them, on the same namespace topology as Overlay's lab:
#
#   PREFIX-ul      underlay bridge br0
#   PREFIX-h1/h2   eth0 192.0.2.11/.12 on br0, bridge cni0 10.244.{1,2}.1/24, ip_forward=1
#   PREFIX-hN-w1   eth0 10.244.N.10/24 on the host's cni0, default via 10.244.N.1
#
# vxlan:   VTEP flannel.1 (VNI 1, port 8472, learning off, local = eth0's address, MTU 1450,
#          10.244.N.0/32), and per peer a permanent neighbour, a bridge FDB entry and an
#          onlink route via the peer subnet's network address: Flannel's three entries.
# host-gw: per peer a route to its subnet via its underlay address on eth0.
#
# Usage: bench/hand-built.sh PREFIX vxlan|host-gw   (root)
# Everything is made inside the namespaces above (veth ends are created directly in their
# namespaces); nothing touches the root namespace. The caller deletes them
# (`ip netns del`); this script stops at the first failing command.
set -euo pipefail

if [ $# -ne 2 ]; then
  echo "usage: $0 PREFIX vxlan|host-gw" >&2
  exit 2
fi
prefix=$1
mode=$2
case "$mode" in
  vxlan) mtu=1450 ;;
  host-gw) mtu=1500 ;;
  *)
    echo "$0: unknown mode $mode (expected vxlan or host-gw)" >&2
    exit 2
    ;;
esac

ul=$prefix-ul
ip netns add "$ul"
ip -n "$ul" link set lo up
ip -n "$ul" link add br0 address 02:42:c0:00:02:01 type bridge
ip -n "$ul" link set br0 up

for i in 1 2; do
  h=$prefix-h$i
  w=$h-w1
  ip netns add "$h"
  ip -n "$h" link set lo up
  ip link add eth0 netns "$h" type veth peer name "h$i" netns "$ul"
  ip -n "$ul" link set "h$i" master br0 up
  ip -n "$h" addr add "192.0.2.1$i/24" dev eth0
  ip -n "$h" link set eth0 up
  ip netns exec "$h" sysctl -qw net.ipv4.ip_forward=1

  ip -n "$h" link add cni0 address "02:42:0a:f4:0$i:01" mtu "$mtu" type bridge
  ip -n "$h" addr add "10.244.$i.1/24" dev cni0
  ip -n "$h" link set cni0 up

  ip netns add "$w"
  ip -n "$w" link set lo up
  ip link add eth0 netns "$w" mtu "$mtu" type veth peer name vw1 netns "$h" mtu "$mtu"
  ip -n "$h" link set vw1 master cni0 up
  ip -n "$w" addr add "10.244.$i.10/24" dev eth0
  ip -n "$w" link set eth0 up
  ip -n "$w" route add default via "10.244.$i.1"

  if [ "$mode" = vxlan ]; then
    ip -n "$h" link add flannel.1 address "02:42:c0:00:02:1$i" type vxlan \
      id 1 local "192.0.2.1$i" dev eth0 dstport 8472 nolearning
    ip -n "$h" link set flannel.1 mtu 1450 up
    ip -n "$h" addr add "10.244.$i.0/32" dev flannel.1
  fi
done

for i in 1 2; do
  h=$prefix-h$i
  j=$((3 - i))
  if [ "$mode" = vxlan ]; then
    ip -n "$h" neigh replace "10.244.$j.0" lladdr "02:42:c0:00:02:1$j" dev flannel.1 nud permanent
    bridge -n "$h" fdb replace "02:42:c0:00:02:1$j" dev flannel.1 dst "192.0.2.1$j" self permanent
    ip -n "$h" route replace "10.244.$j.0/24" via "10.244.$j.0" dev flannel.1 onlink
  else
    ip -n "$h" route replace "10.244.$j.0/24" via "192.0.2.1$j" dev eth0
  fi
done
