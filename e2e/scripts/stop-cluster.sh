#!/usr/bin/env bash
# Stops a control plane started by start-cluster.sh. With --purge, also deletes its state directory.
set -uo pipefail
dir="${1:?usage: stop-cluster.sh DIR [--purge]}"
[[ -d "$dir" ]] || exit 0
if [[ -f "$dir/pids" ]]; then
  # Reverse order: controller-manager, apiserver, then etcd.
  pids="$(tac "$dir/pids")"
  for pid in $pids; do kill "$pid" 2>/dev/null; done
  for _ in $(seq 1 50); do
    alive=""
    for pid in $pids; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [[ -z "$alive" ]] && break
    sleep 0.1
  done
  for pid in $pids; do kill -9 "$pid" 2>/dev/null; done
  : >"$dir/pids"
fi
if [[ -d "$dir/node" ]]; then
  # The node's containers outlive its kubelet, and kube-proxy's rules its process. Another cluster's node
  # may have the machine's network by now (it waited for this one to die): then nothing here is ours.
  here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
  self="$(cd "$dir" && pwd)"
  mkdir -p /run/flywheel
  (
    flock 9
    if [[ "$(cat /run/flywheel/node-owner 2>/dev/null)" == "$self" ]]; then
      "$here/remove-node-containers.sh" "$dir/node/kubelet"
      "${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}/kube-v1.20.2/kube-proxy" --cleanup >/dev/null 2>&1
      "$here/node-network.sh" down "$self"
    else
      "$here/remove-node-containers.sh" --mounts-only "$dir/node/kubelet"
    fi
  ) 9>/run/flywheel/node.lock
fi
if [[ -f "$dir/etcd-data" ]]; then
  rm -rf "$(cat "$dir/etcd-data")"
  rm -f "$dir/etcd-data"
fi
if [[ "${2:-}" == "--purge" ]]; then rm -rf "$dir"; fi
exit 0
