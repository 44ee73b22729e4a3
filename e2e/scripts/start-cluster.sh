#!/usr/bin/env bash
# Starts a fresh local control plane on free 127.0.0.1 ports: etcd (data on /dev/shm), kube-apiserver v1.20.2
# (RBAC, token auth, TLS from a CA made here) and kube-controller-manager (garbage collector, namespace and job
# controllers only). Writes $DIR/kubeconfig and returns when the API server is ready.
#
# usage: start-cluster.sh DIR [--owner-pid PID] [--with-node]
#   DIR               state directory (certs, logs, pids, kubeconfig); created if missing
#   --owner-pid       tear everything down (and delete DIR) once PID exits: a test binary's cluster dies with it
#   --with-node       a real node (start-node.sh: Docker, kubelet, kube-scheduler, kube-proxy, cluster DNS);
#                     the API server then also answers pods on the node's address and Service IP 10.96.0.1,
#                     ServiceAccount tokens are mounted into pods, and every workload controller runs
set -euo pipefail

usage="usage: start-cluster.sh DIR [--owner-pid PID] [--with-node]"
dir="${1:?$usage}"
shift
owner=""
controllers="garbagecollector,namespace,job"
node=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --owner-pid) owner="${2:?--owner-pid needs a PID}"; shift 2 ;;
    --with-node) node=1; shift ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
done
# The node's address (its CNI bridge's gateway), where pods reach the API server and the cluster DNS.
node_ip=10.244.0.1
if [[ -n "$node" ]]; then
  controllers="garbagecollector,namespace,job,deployment,replicaset,statefulset,daemonset,endpoint,endpointslice"
  controllers+=",nodelifecycle,serviceaccount,serviceaccount-token,persistentvolume-binder,attachdetach"
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/build-kube.sh"
bin="${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}/kube-v1.20.2"

mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"
: >"$dir/pids"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

cleanup_on_error() {
  "$here/stop-cluster.sh" "$dir" >/dev/null 2>&1 || true
}
trap cleanup_on_error ERR

# --- certificates and credentials -------------------------------------------------------------------------
pki="$dir/pki"
mkdir -p "$pki"
openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=flywheel-local-ca" \
  -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
  -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,IP:10.96.0.1,IP:%s,DNS:localhost,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n' \
  "$node_ip" >"$pki/san.ext"
openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
  -days 3650 -extfile "$pki/san.ext" -out "$pki/apiserver.crt" 2>/dev/null
openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
token="$(openssl rand -hex 24)"
echo "$token,flywheel-admin,flywheel-admin,system:masters" >"$pki/tokens.csv"

# --- etcd -------------------------------------------------------------------------------------------------
etcd_port="$(free_port)"
peer_port="$(free_port)"
etcd_data="$(mktemp -d /dev/shm/flywheel-etcd.XXXXXX)"
echo "$etcd_data" >"$dir/etcd-data"
etcd --name flywheel --data-dir "$etcd_data" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "flywheel=http://127.0.0.1:$peer_port" \
  >"$dir/etcd.log" 2>&1 &
echo $! >>"$dir/pids"

# --- kube-apiserver ---------------------------------------------------------------------------------------
api_port="$(free_port)"
if [[ -n "$node" ]]; then
  # Pods reach the API server through the `kubernetes` Service, whose endpoint is the node's address; the
  # ServiceAccount admission plugin mounts their tokens.
  "$here/node-network.sh" up "$node_ip" "$dir"
  node_flags=(--bind-address 0.0.0.0 --advertise-address "$node_ip" --endpoint-reconciler-type lease
    --kubelet-preferred-address-types InternalIP)
else
  node_flags=(--bind-address 127.0.0.1 --advertise-address 127.0.0.1 --endpoint-reconciler-type none
    --disable-admission-plugins ServiceAccount)
fi
"$bin/kube-apiserver" \
  --etcd-servers "http://127.0.0.1:$etcd_port" \
  "${node_flags[@]}" --secure-port "$api_port" --insecure-port 0 \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" \
  --token-auth-file "$pki/tokens.csv" \
  --authorization-mode RBAC \
  --service-account-issuer https://kubernetes.default.svc \
  --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
  --service-cluster-ip-range 10.96.0.0/12 \
  --allow-privileged=true \
  >"$dir/apiserver.log" 2>&1 &
echo $! >>"$dir/pids"

# --- kubeconfig -------------------------------------------------------------------------------------------
cat >"$dir/kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: flywheel-local
  cluster:
    server: https://127.0.0.1:$api_port
    certificate-authority: $pki/ca.crt
users:
- name: flywheel-admin
  user:
    token: $token
contexts:
- name: flywheel-local
  context:
    cluster: flywheel-local
    user: flywheel-admin
    namespace: default
current-context: flywheel-local
KUBECONFIG

ready=""
for _ in $(seq 1 120); do
  if curl -fsS --cacert "$pki/ca.crt" -H "Authorization: Bearer $token" \
    "https://127.0.0.1:$api_port/readyz" >/dev/null 2>&1; then
    ready=1
    break
  fi
  sleep 0.5
done
if [[ -z "$ready" ]]; then
  echo "kube-apiserver did not become ready; last log lines:" >&2
  tail -n 30 "$dir/apiserver.log" >&2
  exit 1
fi

# --- kube-controller-manager (garbage collection, namespace deletion, Jobs[, Deployments]) -----------------
"$bin/kube-controller-manager" \
  --kubeconfig "$dir/kubeconfig" \
  --controllers "$controllers" \
  --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
  --leader-elect=false --port 0 --secure-port 0 \
  >"$dir/controller-manager.log" 2>&1 &
echo $! >>"$dir/pids"

if [[ -n "$node" ]]; then
  "$here/start-node.sh" "$dir" "$node_ip" >&2
fi

if [[ -n "$owner" ]]; then
  # Detached reaper: outlives this script, not the owner.
  nohup setsid bash -c '
    while kill -0 "$1" 2>/dev/null; do sleep 1; done
    "$2/stop-cluster.sh" "$3" --purge
  ' reaper "$owner" "$here" "$dir" >/dev/null 2>&1 &
fi

trap - ERR
echo "$dir/kubeconfig"
