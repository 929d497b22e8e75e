#!/usr/bin/env bash
# `make demo`: a whole Overlay cluster on this machine, in network namespaces, and a tour of
# it: cross-host pings between workloads, the leases, one host's routes. The lab stays up
# at the end; the script says how to explore it and how to remove it.
#
# `make demo` builds first (`make build`: system packages, then `cargo build --workspace
# --bins`); this script uses the binaries in target/debug (OVERLAY_BIN_DIR to change it).
# Runs as root (network namespaces): re-executes itself with sudo when needed. Safe to run
# again: it removes the previous demo lab first.
set -euo pipefail

cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    echo "demo: the lab needs root (network namespaces); re-running with sudo" >&2
    exec sudo env OVERLAY_BIN_DIR="${OVERLAY_BIN_DIR:-}" OVERLAY_DEMO_LAB="${OVERLAY_DEMO_LAB:-}" "$0" "$@"
  fi
  echo "demo: needs root to create network namespaces, and sudo is not installed: run it as root" >&2
  exit 1
fi

BIN_DIR=${OVERLAY_BIN_DIR:-target/debug}
[ -n "$BIN_DIR" ] || BIN_DIR=target/debug
CTL="$BIN_DIR/overlayctl"
LAB=${OVERLAY_DEMO_LAB:-demo}
[ -n "$LAB" ] || LAB=demo
if [ ! -x "$CTL" ]; then
  echo "demo: $CTL is missing: run \`make demo\` (it builds first) or \`cargo build --workspace --bins\`" >&2
  exit 1
fi

bold() { if [ -t 1 ]; then printf '\n\033[1m== %s\033[0m\n' "$*"; else printf '\n== %s\n' "$*"; fi; }
# Shows a command, then runs it.
show() { printf '$ %s\n' "$*"; "$@"; }

bold "Removing any previous demo lab"
"$CTL" lab down --name "$LAB"

bold "Starting lab \"$LAB\": 3 hosts, vxlan, one workload per host"
"$CTL" lab up --name "$LAB" --hosts 3 --backend vxlan --workloads-per-host 1

# The workloads and their addresses, from the status table ("h1/w1  10.244.x.y  ...").
mapfile -t WORKLOADS < <("$CTL" lab status --name "$LAB" | awk '$1 ~ /^h[0-9]+\/[A-Za-z0-9_]+$/ { print $1 " " $2 }')
if [ "${#WORKLOADS[@]}" -lt 2 ]; then
  echo "demo: expected at least two workloads, found ${#WORKLOADS[@]}" >&2
  exit 1
fi

bold "Cross-host pings: every workload pings every other one across the overlay"
failed=0
for from in "${WORKLOADS[@]}"; do
  for to in "${WORKLOADS[@]}"; do
    [ "$from" = "$to" ] && continue
    src=${from%% *}
    dst=${to%% *}
    ip=${to#* }
    result=""
    # The first packet to a new peer may wait for neighbour resolution: a few tries.
    for _ in 1 2 3; do
      if out=$("$CTL" lab exec --name "$LAB" "$src" -- ping -c 1 -W 2 "$ip" 2>&1); then
        result="ok, $(sed -n 's/.*time=\([0-9.]* ms\).*/\1/p' <<<"$out")"
        break
      fi
    done
    if [ -z "$result" ]; then
      result="FAILED"
      failed=1
    fi
    printf '  %-8s -> %-8s %-15s %s\n' "$src" "$dst" "$ip" "$result"
  done
done

bold "Leases held in etcd, through the lab's controller"
show "$CTL" lab ctl --name "$LAB" -- leases

bold "Routes host h1's agent programmed (proto 79) and its VXLAN device"
show "$CTL" lab exec --name "$LAB" h1 -- ip route show proto 79
show "$CTL" lab exec --name "$LAB" h1 -- bridge fdb show dev ovl.1
if "$CTL" routes --help >/dev/null 2>&1; then
  bold "What h1 should have, computed by the controller from the leases"
  show "$CTL" lab ctl --name "$LAB" -- routes --node h1
fi

bold "The lab stays up. Explore it:"
explore() { printf '  %-74s # %s\n' "$1" "$2"; }
explore "$CTL lab status --name $LAB" "hosts, subnets, workloads, log files"
explore "$CTL lab exec --name $LAB h1/w1 -- ping ${WORKLOADS[1]#* }" "h1/w1 -> h2/w1 (Ctrl-C stops)"
explore "$CTL lab exec --name $LAB h1 -- bash" "a shell on host h1"
explore "$CTL lab ctl --name $LAB -- watch" "follow lease changes"
explore "$CTL lab workload add --name $LAB h2 web --publish 8080:80" "192.0.2.12:8080 -> web:80"
explore "$CTL lab workload rm --name $LAB h2 web" "CNI DEL"
echo
echo "Stop it and remove everything it made (namespaces, processes, /run/overlay-lab/$LAB):"
echo "  $CTL lab down --name $LAB"

if [ "$failed" -ne 0 ]; then
  echo
  echo "demo: some pings failed; the logs are listed by \`$CTL lab status --name $LAB\`" >&2
  exit 1
fi
