#!/usr/bin/env bash
# The local end-to-end demo: a fresh control plane on 127.0.0.1, the Flywheel CRDs, the operator, a kubelet
# stand-in, every manifest of examples/, and `kubectl get flywheel`.
#   scripts/demo.sh          run and tear down
#   scripts/demo.sh --keep   leave it running and print how to reach it
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$repo"
keep=""
[[ "${1:-}" == "--keep" ]] && keep=1

prepare_system
step "building the Flywheel binaries"
cargo build --workspace --bins --locked

state="$FLYWHEEL_CACHE/demo"
"$repo/e2e/scripts/stop-cluster.sh" "$state" --purge
step "starting etcd + kube-apiserver + kube-controller-manager"
owner=()
[[ -z "$keep" ]] && owner=(--owner-pid $$)
kubeconfig="$("$repo/e2e/scripts/start-cluster.sh" "$state" "${owner[@]}" | tail -n 1)"
export KUBECONFIG="$kubeconfig"
kubectl="$FLYWHEEL_CACHE/kube-v1.20.2/kubectl"

step "installing the CRDs"
# A 1.20 server does not know x-kubernetes-validations (CEL); kubectl's client-side check would refuse them.
"$kubectl" apply --validate=false -f crds/
"$kubectl" wait --for condition=established --timeout=60s crd --all

step "starting the operator and the kubelet stand-in"
"$FLYWHEEL_BIN_DIR/flywheel-operator" --http-addr 127.0.0.1:0 --log-format json >"$state/operator.log" 2>&1 &
echo $! >>"$state/pids"
"$FLYWHEEL_BIN_DIR/flywheel-kubelet" "$FLYWHEEL_BIN_DIR" "$state/pods" >"$state/kubelet.log" 2>&1 &
echo $! >>"$state/pids"

step "applying examples/"
"$kubectl" apply -f examples/
for kind in featureviews trainingjobs modelversions rollouts gpuquotas; do
  "$kubectl" wait --for condition=Ready --timeout=60s "$kind" --all
done

step "kubectl get flywheel"
"$kubectl" get flywheel -o wide

if [[ -n "$keep" ]]; then
  cat <<EOT

The demo is still running. Try:
  export KUBECONFIG=$kubeconfig
  $kubectl get flywheel
  $kubectl describe rollout ctr
Operator logs: $state/operator.log
Stop it with:  e2e/scripts/stop-cluster.sh $state --purge
EOT
else
  "$repo/e2e/scripts/stop-cluster.sh" "$state" --purge
fi
