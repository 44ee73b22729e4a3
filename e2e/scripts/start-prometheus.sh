#!/usr/bin/env bash
# Starts Prometheus 3 (Debian sid's, with Kubernetes discovery: install-prometheus.sh) for the cluster in DIR,
# scraping what the chart's ServiceMonitor and PodMonitor select, the way the Prometheus Operator turns them
# into scrape configs: the operator's metrics Service (port http-metrics, in the release's namespace, its
# labels honored) and every Rollout's serving and router pods (port admin, any namespace). It finds them
# through the API server with a ServiceAccount of its own that may only list and watch.
#
# usage: start-prometheus.sh DIR LISTEN_IP [RULES_FILE] [RELEASE_NAMESPACE]
#   LISTEN_IP   where it listens (the node's address, so that pods reach it too)
#   RULES_FILE  alerting and recording rules to evaluate
# Prints its URL as the last line. It stops with the cluster: its pid joins DIR/pids.
set -euo pipefail

usage="usage: start-prometheus.sh DIR LISTEN_IP [RULES_FILE] [RELEASE_NAMESPACE]"
dir="${1:?$usage}"
listen_ip="${2:?$usage}"
rules="${3:-}"
release_namespace="${4:-flywheel-system}"
cache="${FLYWHEEL_CACHE:-$HOME/.cache/flywheel}"
prometheus_dir="$cache/prometheus-sid"
kubectl_() { "$cache/kube-v1.20.2/kubectl" --kubeconfig "$dir/kubeconfig" "$@"; }

state="$dir/prometheus"
mkdir -p "$state"
kubectl_ apply -f - <<EOT >/dev/null
apiVersion: v1
kind: Namespace
metadata: {name: monitoring}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: prometheus, namespace: monitoring}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: prometheus-discovery}
rules:
  - apiGroups: [""]
    resources: [pods, services, endpoints]
    verbs: [get, list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: prometheus-discovery}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: prometheus-discovery}
subjects: [{kind: ServiceAccount, name: prometheus, namespace: monitoring}]
EOT
secret=""
for _ in $(seq 1 60); do
  secret="$(kubectl_ -n monitoring get serviceaccount prometheus -o jsonpath='{.secrets[0].name}' 2>/dev/null || true)"
  [[ -n "$secret" ]] && break
  sleep 0.5
done
[[ -n "$secret" ]] || { echo "the prometheus ServiceAccount got no token" >&2; exit 1; }
kubectl_ -n monitoring get secret "$secret" -o jsonpath='{.data.token}' | base64 -d >"$state/token"
api_server="$(awk '/server:/ {print $2; exit}' "$dir/kubeconfig")"

rule_files=""
if [[ -n "$rules" ]]; then
  cp "$rules" "$state/rules.yaml"
  rule_files="rule_files: [rules.yaml]"
fi
cat >"$state/prometheus.yml" <<EOT
global: {scrape_interval: 1s, evaluation_interval: 1s}
$rule_files
scrape_configs:
  - job_name: flywheel-operator
    honor_labels: true
    kubernetes_sd_configs:
      - role: endpoints
        api_server: $api_server
        tls_config: {ca_file: $dir/pki/ca.crt}
        authorization: {credentials_file: $state/token}
        namespaces: {names: [$release_namespace]}
    relabel_configs:
      - {source_labels: [__meta_kubernetes_service_label_app_kubernetes_io_name], regex: flywheel-operator, action: keep}
      - {source_labels: [__meta_kubernetes_endpoint_port_name], regex: http-metrics, action: keep}
      - {source_labels: [__meta_kubernetes_pod_name], target_label: pod}
  - job_name: flywheel-serving
    kubernetes_sd_configs:
      - role: pod
        api_server: $api_server
        tls_config: {ca_file: $dir/pki/ca.crt}
        authorization: {credentials_file: $state/token}
    relabel_configs:
      - {source_labels: [__meta_kubernetes_pod_label_flywheel_dev_role], regex: serve|router, action: keep}
      - {source_labels: [__meta_kubernetes_pod_container_port_name], regex: admin, action: keep}
      - {source_labels: [__meta_kubernetes_pod_phase], regex: Running, action: keep}
      - {source_labels: [__meta_kubernetes_namespace], target_label: namespace}
      - {source_labels: [__meta_kubernetes_pod_name], target_label: pod}
EOT
"$prometheus_dir/promtool" check config "$state/prometheus.yml" >/dev/null

port="$(python3 -c 'import socket, sys; s = socket.socket(); s.bind((sys.argv[1], 0)); print(s.getsockname()[1])' "$listen_ip")"
setsid "$prometheus_dir/prometheus" --config.file="$state/prometheus.yml" \
  --storage.tsdb.path="$state/data" --web.listen-address="$listen_ip:$port" \
  >"$state/prometheus.log" 2>&1 </dev/null &
echo $! >>"$dir/pids"
url="http://$listen_ip:$port"
for _ in $(seq 1 60); do
  if python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/-/ready", timeout=1)' "$url" 2>/dev/null; then
    echo "$url"
    exit 0
  fi
  sleep 0.5
done
echo "prometheus did not become ready; last log lines:" >&2
tail -n 20 "$state/prometheus.log" >&2
exit 1
