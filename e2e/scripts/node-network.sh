#!/usr/bin/env bash
# The local node's network: the CNI bridge `fwbr0` (pods' 10.244.0.0/24, the node's own address as gateway),
# the Service range routed onto it, and firewall rules that let pods talk to each other through Services and
# keep every packet from a pod on this machine. Idempotent.
#
# usage: node-network.sh up NODE_IP OWNER | down OWNER
#   OWNER  the state directory of the cluster whose node this is. The network is one per machine: `up` waits
#          until a previous owner has been torn down (its directory is gone) or is dead (none of its pids
#          lives), and `down` leaves the network alone once another cluster owns it.
#
# Pod traffic is bridged through iptables (bridge-nf-call-iptables), which is how kube-proxy's Service rules see
# it; a Docker daemon started with its default settings has set the FORWARD policy to DROP, so bridged pod
# traffic is accepted explicitly. Nothing from a pod is forwarded to any other interface, and the Service range
# is routed onto the bridge, never to the default route: an address without endpoints stays unanswered here.
set -euo pipefail

bridge=fwbr0
service_range=10.96.0.0/12
owner_file=/run/flywheel/node-owner

# Whether the cluster in directory $1 still has a live process.
alive() {
  local pid
  [[ -f "$1/pids" ]] || return 1
  while read -r pid; do
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null && return 0
  done <"$1/pids"
  return 1
}

# Takes the network once no live cluster owns it. Under the lock stop-cluster.sh tears a node down with: a
# reaper either finishes first or, finding the network taken, leaves it alone.
claim() {
  local owner="$1" previous
  mkdir -p "$(dirname "$owner_file")"
  for _ in $(seq 1 240); do
    exec 9>"$(dirname "$owner_file")/node.lock"
    flock 9
    previous="$(cat "$owner_file" 2>/dev/null || true)"
    if [[ -z "$previous" || "$previous" == "$owner" || ! -d "$previous" ]] || ! alive "$previous"; then
      echo "$owner" >"$owner_file"
      return 0
    fi
    exec 9>&-
    sleep 0.5
  done
  echo "the node network still belongs to $previous" >&2
  return 1
}

rule() {
  # rule ACTION CHAIN SPEC...: insert (-I) or delete (-D) a FORWARD rule once.
  local action="$1"
  shift
  if iptables -C "$@" 2>/dev/null; then
    [[ "$action" == -D ]] && iptables -D "$@"
  else
    [[ "$action" == -I ]] && iptables -I "$@"
  fi
  return 0
}

case "${1:-}" in
  up)
    node_ip="${2:?usage: node-network.sh up NODE_IP OWNER}"
    claim "${3:?usage: node-network.sh up NODE_IP OWNER}"
    ip link show "$bridge" >/dev/null 2>&1 || ip link add "$bridge" type bridge
    ip addr replace "$node_ip/24" dev "$bridge"
    ip link set "$bridge" up
    ip route replace "$service_range" dev "$bridge" src "$node_ip"
    [[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]] || modprobe br_netfilter
    echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables
    # Inserted in reverse: the DROP ends up below the ACCEPT.
    rule -I FORWARD -i "$bridge" ! -o "$bridge" -j DROP
    rule -I FORWARD -i "$bridge" -o "$bridge" -j ACCEPT
    ;;
  down)
    [[ "$(cat "$owner_file" 2>/dev/null || true)" == "${2:?usage: node-network.sh down OWNER}" ]] || exit 0
    rule -D FORWARD -i "$bridge" -o "$bridge" -j ACCEPT
    rule -D FORWARD -i "$bridge" ! -o "$bridge" -j DROP
    ip route del "$service_range" dev "$bridge" 2>/dev/null || true
    ip link del "$bridge" 2>/dev/null || true
    rm -f "$owner_file"
    ;;
  *)
    echo "usage: node-network.sh up NODE_IP OWNER | down OWNER" >&2
    exit 2
    ;;
esac
