#!/usr/bin/env bash
# Joins a real node to a control plane started by `start-cluster.sh --with-node`: kubelet v1.20.2 driving Docker
# through its built-in dockershim, kube-scheduler, kube-proxy (iptables) and cluster DNS (dnsmasq answering
# cluster.local from the records `flywheel-cluster-dns` keeps from Services and Endpoints). Pods get addresses
# on the CNI bridge (node-network.sh), Services real ClusterIPs. Its processes join the cluster's pid file;
# stop-cluster.sh stops them and removes the node's containers. Returns once the node is Ready.
#
# usage: start-node.sh CLUSTER_DIR NODE_IP
#
# One node per Docker daemon: a kubelet removes containers of pods it does not know, so two nodes on one
# daemon remove each other's. This machine runs one node at a time.
set -euo pipefail

cluster="${1:?usage: start-node.sh CLUSTER_DIR NODE_IP}"
node_ip="${2:?usage: start-node.sh CLUSTER_DIR NODE_IP}"
cluster="$(cd "$cluster" && pwd)"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}"
bin="$cache/kube-v1.20.2"
kubeconfig="$cluster/kubeconfig"
dir="$cluster/node"
node_name=node1
pause_image=local/pause:3.2
export DOCKER="${DOCKER:-docker}"

"$here/build-kube.sh"
"$here/install-node-deps.sh"
"$here/ensure-docker.sh"
mkdir -p "$dir"/{cni,ipam,dns,kubelet}

# A node that outlived its cluster (its kubelet is gone) leaves containers behind: remove them first.
if ! pgrep -x kubelet >/dev/null; then
  "$here/remove-node-containers.sh"
fi

# The pod sandbox image, from the pause binary build-kube.sh built.
if ! "$DOCKER" image inspect "$pause_image" >/dev/null 2>&1; then
  tar -C "$bin" -c pause | "$DOCKER" import --change 'ENTRYPOINT ["/pause"]' - "$pause_image" >/dev/null
fi

# Pods get a route to the Service range through the node and none elsewhere: the pod subnet is on-link, and
# nothing else is reachable from a pod.
cat >"$dir/cni/10-flywheel.conflist" <<CNI
{
  "cniVersion": "0.4.0",
  "name": "flywheel",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "fwbr0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "10.244.0.0/24", "gateway": "$node_ip"}]],
        "routes": [{"dst": "10.96.0.0/12"}],
        "dataDir": "$dir/ipam"
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
CNI

# --- cluster DNS: records from the API server, answered by dnsmasq on the node's address ------------------------
"${FLYWHEEL_BIN_DIR:-$cache/target/debug}/flywheel-cluster-dns" --kubeconfig "$kubeconfig" --hosts-dir "$dir/dns" \
  >"$dir/cluster-dns.log" 2>&1 &
echo $! >>"$cluster/pids"
# No upstream servers: a name outside cluster.local gets no answer from here, and nothing leaves the machine.
# It stays root: the records live in the cluster's state directory, which may be in root's home.
dnsmasq --keep-in-foreground --no-resolv --no-hosts --no-poll --listen-address "$node_ip" --bind-interfaces \
  --hostsdir "$dir/dns" --local=/cluster.local/ --domain-needed --bogus-priv --cache-size=0 \
  --user=root --pid-file="$dir/dnsmasq.pid" --log-facility=- >"$dir/dnsmasq.log" 2>&1 &
echo $! >>"$cluster/pids"

# --- kube-scheduler, kube-proxy, kubelet ------------------------------------------------------------------------
"$bin/kube-scheduler" --kubeconfig "$kubeconfig" --leader-elect=false --port 0 --secure-port 0 \
  >"$dir/scheduler.log" 2>&1 &
echo $! >>"$cluster/pids"

"$bin/kube-proxy" --kubeconfig "$kubeconfig" --proxy-mode iptables --cluster-cidr 10.244.0.0/16 \
  --hostname-override "$node_name" --bind-address "$node_ip" --conntrack-max-per-core 0 --oom-score-adj 0 \
  --metrics-bind-address 127.0.0.1:10249 --healthz-bind-address 127.0.0.1:10256 \
  >"$dir/proxy.log" 2>&1 &
echo $! >>"$cluster/pids"

"$bin/kubelet" --kubeconfig "$kubeconfig" --hostname-override "$node_name" \
  --node-ip "$node_ip" --address "$node_ip" --read-only-port 0 \
  --container-runtime docker --docker-endpoint "${DOCKER_HOST:-unix:///var/run/docker.sock}" \
  --network-plugin cni --cni-bin-dir /usr/lib/cni --cni-conf-dir "$dir/cni" \
  --pod-infra-container-image "$pause_image" \
  --cgroup-driver cgroupfs --cgroups-per-qos=false --enforce-node-allocatable= \
  --fail-swap-on=false --eviction-hard= --image-gc-high-threshold 100 --image-gc-low-threshold 99 \
  --root-dir "$dir/kubelet" --cluster-domain cluster.local --cluster-dns "$node_ip" --oom-score-adj 0 \
  --resolv-conf /dev/null --max-pods 60 \
  >"$dir/kubelet.log" 2>&1 &
echo $! >>"$cluster/pids"

kubectl_() { "$bin/kubectl" --kubeconfig "$kubeconfig" "$@"; }
# The cluster DNS answers for the API server's Service (a DNS query by hand: the host's resolver is not it).
dns_answers() {
  python3 - "$node_ip" <<'PY'
import socket, sys
name = b"".join(bytes([len(label)]) + label.encode() for label in "kubernetes.default.svc.cluster.local".split("."))
query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + name + b"\x00\x00\x01\x00\x01"
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.settimeout(1)
udp.sendto(query, (sys.argv[1], 53))
answer = udp.recv(512)
sys.exit(0 if answer[6:8] != b"\x00\x00" and answer[-4:] == bytes([10, 96, 0, 1]) else 1)
PY
}
ready=""
for _ in $(seq 1 120); do
  if [[ "$(kubectl_ get node "$node_name" -o jsonpath='{.status.conditions[?(@.type=="Ready")].status}' 2>/dev/null)" == True ]]; then
    ready=1
    break
  fi
  sleep 0.5
done
if [[ -z "$ready" ]]; then
  echo "node $node_name did not become Ready; last kubelet log lines:" >&2
  tail -n 30 "$dir/kubelet.log" >&2
  exit 1
fi
for _ in $(seq 1 60); do
  if dns_answers 2>/dev/null; then
    echo "node $node_name is Ready at $node_ip; cluster DNS answers there"
    exit 0
  fi
  sleep 0.5
done
echo "cluster DNS does not answer for kubernetes.default; its logs:" >&2
tail -n 10 "$dir/dnsmasq.log" "$dir/cluster-dns.log" >&2
exit 1
