#!/usr/bin/env bash
# The local node's network: the CNI bridge `fwbr0` (pods' 10.244.0.0/24, the node's own address as gateway),
# the Service range routed onto it, and firewall rules that let pods talk to each other through Services and
# keep every packet from a pod on this machine. Idempotent.
#
# usage: node-network.sh up NODE_IP | down
#
# Pod traffic is bridged through iptables (bridge-nf-call-iptables), which is how kube-proxy's Service rules see
# it; a Docker daemon started with its default settings has set the FORWARD policy to DROP, so bridged pod
# traffic is accepted explicitly. Nothing from a pod is forwarded to any other interface, and the Service range
# is routed onto the bridge, never to the default route: an address without endpoints stays unanswered here.
set -euo pipefail

bridge=fwbr0
service_range=10.96.0.0/12

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
    node_ip="${2:?usage: node-network.sh up NODE_IP}"
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
    rule -D FORWARD -i "$bridge" -o "$bridge" -j ACCEPT
    rule -D FORWARD -i "$bridge" ! -o "$bridge" -j DROP
    ip route del "$service_range" dev "$bridge" 2>/dev/null || true
    ip link del "$bridge" 2>/dev/null || true
    ;;
  *)
    echo "usage: node-network.sh up NODE_IP | down" >&2
    exit 2
    ;;
esac
