#!/usr/bin/env bash
# Installs the Debian packages a local node needs: Docker (dockerd, containerd, runc, and a BuildKit-capable
# client), the CNI plugins, iptables and conntrack for kube-proxy, dnsmasq for cluster DNS, and Docker's own
# registry (distribution) to publish images to on loopback. Idempotent and quiet when present.
set -euo pipefail

need=()
[[ -x /usr/sbin/dockerd && -x /usr/bin/docker ]] || need+=(docker.io)
[[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local ]] || need+=(containernetworking-plugins)
command -v iptables >/dev/null || need+=(iptables)
command -v conntrack >/dev/null || need+=(conntrack)
command -v dnsmasq >/dev/null || need+=(dnsmasq-base)
command -v ip >/dev/null || need+=(iproute2)
command -v docker-registry >/dev/null || need+=(docker-registry)
if ((${#need[@]})); then
  sudo=""
  [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
