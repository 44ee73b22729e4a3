#!/usr/bin/env bash
# Makes sure a Docker daemon answers on $DOCKER_HOST (default /var/run/docker.sock); starts one if none does,
# detached, logging to $FLYWHEEL_CACHE/dockerd.log. It is started without its own bridge, NAT or firewall
# rules: pods get their network from CNI, and images build from local files only.
set -euo pipefail

docker="${DOCKER:-docker}"
"$docker" info >/dev/null 2>&1 && exit 0

cache="${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}"
mkdir -p "$cache"
setsid nohup dockerd --storage-driver overlay2 --exec-opt native.cgroupdriver=cgroupfs \
  --iptables=false --ip-masq=false --bridge=none \
  >"$cache/dockerd.log" 2>&1 </dev/null &
for _ in $(seq 1 60); do
  "$docker" info >/dev/null 2>&1 && exit 0
  sleep 0.5
done
echo "dockerd did not start; last log lines:" >&2
tail -n 20 "$cache/dockerd.log" >&2
exit 1
