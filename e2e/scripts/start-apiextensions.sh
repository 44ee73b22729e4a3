#!/usr/bin/env bash
# Starts a current apiextensions-apiserver (see build-apiextensions.sh) beside a control plane started by
# start-cluster.sh: its own etcd, a serving certificate signed by the cluster's CA, and authentication and
# authorization delegated to the v1.20 API server (TokenReview, SubjectAccessReview), so the cluster's token
# works here too. Its processes join the cluster's pid file, so stop-cluster.sh (and the cluster's reaper)
# stop them with the rest. Prints the path of a kubeconfig for it once it is ready.
#
# usage: start-apiextensions.sh CLUSTER_DIR
#
# It serves only /apis/apiextensions.k8s.io/v1 and the groups of the CRDs created in it (no /api): talk to it
# over HTTP with explicit resources, not with kubectl's discovery.
set -euo pipefail

cluster="${1:?usage: start-apiextensions.sh CLUSTER_DIR}"
cluster="$(cd "$cluster" && pwd)"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$here/build-apiextensions.sh"
bin="${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}/apiextensions-apiserver/apiextensions-apiserver"

dir="$cluster/apiextensions"
rm -rf "$dir"
mkdir -p "$dir/pki"
pki="$cluster/pki"

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

openssl req -newkey rsa:2048 -nodes -subj "/CN=apiextensions-apiserver" \
  -keyout "$dir/pki/serving.key" -out "$dir/pki/serving.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n' >"$dir/pki/san.ext"
openssl x509 -req -in "$dir/pki/serving.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
  -days 3650 -extfile "$dir/pki/san.ext" -out "$dir/pki/serving.crt" 2>/dev/null

etcd_port="$(free_port)"
peer_port="$(free_port)"
etcd --name apiextensions --data-dir "$dir/etcd" \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "apiextensions=http://127.0.0.1:$peer_port" \
  >"$dir/etcd.log" 2>&1 &
echo $! >>"$cluster/pids"

# The admission plugins turned off, and API priority and fairness, need core APIs newer than the v1.20 server
# it delegates to (their informers would never sync, and the server would never be ready).
port="$(free_port)"
"$bin" \
  --etcd-servers "http://127.0.0.1:$etcd_port" \
  --bind-address 127.0.0.1 --secure-port "$port" \
  --tls-cert-file "$dir/pki/serving.crt" --tls-private-key-file "$dir/pki/serving.key" \
  --authentication-kubeconfig "$cluster/kubeconfig" --authorization-kubeconfig "$cluster/kubeconfig" \
  --kubeconfig "$cluster/kubeconfig" --enable-priority-and-fairness=false \
  --disable-admission-plugins=NamespaceLifecycle,ValidatingAdmissionWebhook,MutatingAdmissionWebhook,ValidatingAdmissionPolicy,MutatingAdmissionPolicy \
  >"$dir/apiserver.log" 2>&1 &
echo $! >>"$cluster/pids"

sed "s|server: https://127.0.0.1:[0-9]*|server: https://127.0.0.1:$port|" "$cluster/kubeconfig" >"$dir/kubeconfig"
token="$(awk '/token:/ {print $2; exit}' "$cluster/kubeconfig")"
for _ in $(seq 1 120); do
  if curl -fsS --cacert "$pki/ca.crt" -H "Authorization: Bearer $token" \
    "https://127.0.0.1:$port/readyz" >/dev/null 2>&1; then
    echo "$dir/kubeconfig"
    exit 0
  fi
  sleep 0.5
done
echo "apiextensions-apiserver did not become ready; last log lines:" >&2
tail -n 30 "$dir/apiserver.log" >&2
exit 1
