#!/usr/bin/env bash
# CNI ADD+DEL latency of overlay-cni against Debian's reference plugins (bridge with
# host-local IPAM), side by side in one run on this machine (`make bench-cni`).
#
# Both plugins are driven exactly as a runtime drives them: a fresh process per call, the
# CNI_* variables, the config on stdin, inside a "host" network namespace (made here and
# deleted at the end; nothing is touched in the root namespace). Each iteration attaches a
# container namespace (ADD) and detaches it (DEL); the two plugins alternate which goes
# first, so neither always runs on a warmer cache. A third row times /bin/true through the
# same harness: the floor of any plugin call here (fork, exec, here-string), which the
# plugins' own work is on top of. Times come from bash's $EPOCHREALTIME (microseconds, no
# extra process per reading).
#
# Environment: N (iterations, default 200), WARMUP (default 10), OVERLAY_CNI (default
# target/release/overlay-cni), CNI_DIR (default /usr/lib/cni).
set -euo pipefail

cd "$(dirname "$0")/.."
N=${N:-200}
WARMUP=${WARMUP:-10}
OVERLAY_CNI=$(realpath "${OVERLAY_CNI:-target/release/overlay-cni}")
CNI_DIR=${CNI_DIR:-/usr/lib/cni}

if [ "$(id -u)" -ne 0 ]; then
  echo "bench-cni: needs root (network namespaces)" >&2
  exit 1
fi
for f in "$OVERLAY_CNI" "$CNI_DIR/bridge" "$CNI_DIR/host-local"; do
  if [ ! -x "$f" ]; then
    echo "bench-cni: $f is missing (cargo build --release -p overlay-agent; apt-get install containernetworking-plugins)" >&2
    exit 1
  fi
done

tag="ovlcni-$$"
host="$tag-host"
tmp=$(mktemp -d)
cleanup() {
  for ns in "$tag-a" "$tag-b" "$tag-c" "$host"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT

ip netns add "$host"
ip -n "$host" link set lo up
# overlay-cni's side of the host, as overlay-agent makes it: bridge ovl0 holding the
# subnet's gateway, and subnet.env.
ip -n "$host" link add ovl0 address 0a:58:0a:f4:07:01 type bridge
ip -n "$host" addr add 10.244.7.1/24 dev ovl0
ip -n "$host" link set ovl0 up
printf 'OVERLAY_NETWORK=10.244.0.0/16\nOVERLAY_SUBNET=10.244.7.1/24\nOVERLAY_MTU=1450\nOVERLAY_IPMASQ=false\n' >"$tmp/subnet.env"
for c in a b c; do
  ip netns add "$tag-$c"
  ip -n "$tag-$c" link set lo up
done

overlay_conf=$(printf '{"cniVersion":"1.0.0","name":"bench-overlay","type":"overlay-cni","subnetFile":"%s","dataDir":"%s","bridge":"ovl0"}' \
  "$tmp/subnet.env" "$tmp/overlay-ipam")
# The reference plugin makes its bridge (cni0) and gateway itself on the first ADD.
bridge_conf=$(printf '{"cniVersion":"1.0.0","name":"bench-bridge","type":"bridge","bridge":"cni0","isGateway":true,"ipMasq":false,"mtu":1450,"ipam":{"type":"host-local","subnet":"10.245.7.0/24","routes":[{"dst":"0.0.0.0/0"}],"dataDir":"%s"}}' \
  "$tmp/host-local")

# The measuring loop runs inside the host namespace, so the plugins start right there.
export N WARMUP OVERLAY_CNI CNI_DIR overlay_conf bridge_conf tmp tag
ip netns exec "$host" bash -c '
set -euo pipefail
us() { local t=${1//[.,]/}; echo $((10#$t)); }
# call PLUGIN COMMAND CONF NETNS: one invocation; its duration in microseconds in $took.
call() {
  local t0 t1
  t0=$EPOCHREALTIME
  if ! CNI_COMMAND=$2 CNI_CONTAINERID=bench CNI_NETNS=/run/netns/$4 CNI_IFNAME=eth0 CNI_PATH=$CNI_DIR \
      "$1" <<<"$3" >"$tmp/out" 2>"$tmp/err"; then
    echo "bench-cni: $1 $2 failed: $(cat "$tmp/out" "$tmp/err")" >&2
    exit 1
  fi
  t1=$EPOCHREALTIME
  took=$(( $(us "$t1") - $(us "$t0") ))
}
# one NAME PLUGIN CONF NETNS RECORD: ADD then DEL, appended to $tmp/NAME.{add,del,both}.
one() {
  call "$2" ADD "$3" "$4"; local add=$took
  call "$2" DEL "$3" "$4"; local del=$took
  if [ "$5" = 1 ]; then
    echo "$add" >>"$tmp/$1.add"; echo "$del" >>"$tmp/$1.del"; echo $((add + del)) >>"$tmp/$1.both"
  fi
}
for ((i = 0; i < WARMUP + N; i++)); do
  record=$(( i >= WARMUP ? 1 : 0 ))
  if (( i % 2 == 0 )); then
    one overlay "$OVERLAY_CNI" "$overlay_conf" "$tag-a" $record
    one bridge "$CNI_DIR/bridge" "$bridge_conf" "$tag-b" $record
  else
    one bridge "$CNI_DIR/bridge" "$bridge_conf" "$tag-b" $record
    one overlay "$OVERLAY_CNI" "$overlay_conf" "$tag-a" $record
  fi
  one floor /bin/true "{}" "$tag-c" $record
done
'

# pct FILE P: the P-th percentile (nearest rank) in ms.
pct() {
  sort -n "$1" | awk -v p="$2" '{ v[NR] = $1 } END { r = int((p / 100) * NR + 0.999999); if (r < 1) r = 1; printf "%.2f", v[r] / 1000 }'
}
row() {
  printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$1" \
    "$(pct "$tmp/$2.add" 50)" "$(pct "$tmp/$2.del" 50)" "$(pct "$tmp/$2.both" 50)" \
    "$(pct "$tmp/$2.both" 99)" "$(pct "$tmp/$2.both" 0)" "$(pct "$tmp/$2.both" 100)"
}
echo "CNI ADD+DEL latency, $N iterations each (after $WARMUP warm-up), $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "overlay-cni: $OVERLAY_CNI; reference plugins: $CNI_DIR ($(dpkg-query -W -f '${Version}' containernetworking-plugins 2>/dev/null || echo unknown))"
echo
echo "| plugin (ms) | ADD p50 | DEL p50 | ADD+DEL p50 | ADD+DEL p99 | ADD+DEL min | ADD+DEL max |"
echo "|---|---|---|---|---|---|---|"
row "overlay-cni" overlay
row "bridge + host-local" bridge
row "/bin/true (harness floor)" floor
