#!/usr/bin/env bash
# The local end-to-end demo: a fresh control plane on 127.0.0.1, the Flywheel CRDs, the operator, a kubelet
# stand-in, every manifest of examples/, a parameter-server TrainingJob that trains on generated data under a
# GPUQuota and leaves a ModelVersion, a FeatureView materialized into Redis by an operator-scheduled Job and a
# point-in-time training set built from it, and `kubectl get flywheel`.
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
for kind in featureviews modelversions rollouts gpuquotas; do
  "$kubectl" wait --for condition=Ready --timeout=60s "$kind" --all
done

step "generating CTR training data"
data="$state/data"
"$FLYWHEEL_BIN_DIR/flywheel-trainer" generate --rows 100000 --users 2000 --items 400 --buckets 20000 --out "$data"

step "a parameter-server TrainingJob (2 servers, 2 workers) admitted under the ranking-team GPUQuota"
"$kubectl" apply -f - <<EOT
apiVersion: flywheel.dev/v1alpha1
kind: TrainingJob
metadata:
  name: ctr-demo
spec:
  data:
    dataset:
      train: file://$data/train.parquet
      eval: file://$data/eval.parquet
      label: clicked
  model: {name: ctr, architecture: deepfm, embeddingDim: 8, hiddenLayers: [64, 32]}
  optimizer: {kind: adagrad, learningRate: 0.002, sparseLearningRate: 0.05}
  epochs: 2
  batchSize: 512
  seed: 42
  topology:
    parameterServer: {servers: 2, workers: 2}
  queue: ranking-team
  checkpoint: {uri: "file://$state/checkpoints/", everySteps: 100}
  output: {artifactUri: "file://$state/models/"}
EOT
"$kubectl" wait --for condition=Admitted --timeout=60s trainingjob/ctr-demo
"$kubectl" get pods -l flywheel.dev/training-job=ctr-demo -o wide
step "training for real (the kubelet stand-in runs flywheel-trainer as the pods' processes)"
"$kubectl" wait --for condition=Ready --timeout=600s trainingjob/ctr-demo
"$kubectl" get pods -l flywheel.dev/training-job=ctr-demo

step "a FeatureView materialized into Redis by an operator-scheduled Job"
redis_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >"$state/redis.log" 2>&1 &
echo $! >>"$state/pids"
"$FLYWHEEL_BIN_DIR/flywheel-trainer" generate-events --events 100000 --users 2000 --labels 20000 --out "$state/events"
"$kubectl" apply -f - <<EOT
apiVersion: flywheel.dev/v1alpha1
kind: FeatureView
metadata:
  name: user-activity
spec:
  entities: [{name: user, joinKey: user_id, valueType: Int64}]
  source:
    batch: {uri: "file://$state/events/events.parquet", timestampField: event_timestamp}
  features:
    - {name: price, valueType: Float64}
    - {name: category, valueType: String}
    - {name: spend_1h, column: price, valueType: Float64, aggregation: {function: sum, window: 1h}}
    - {name: events_1d, column: price, valueType: Int64, aggregation: {function: count, window: 1d}}
    - {name: log_price, column: price, valueType: Float64, transform: {log1p: {}}}
  ttl: 2d
  offline: {uri: "file://$state/offline/user-activity"}
  online: {redis: {address: "127.0.0.1:$redis_port"}}
  materialization: {schedule: "*/5 * * * *"}
EOT
"$kubectl" wait --for condition=Materialized --timeout=180s featureview/user-activity
"$kubectl" get featureview user-activity
"$kubectl" get featureview user-activity -o jsonpath='{.status.lastMaterialization}{"\n"}'
echo "online features of user 42:"
redis-cli -p "$redis_port" hgetall "default/user-activity:42" | paste - -
step "a point-in-time correct training set from the FeatureView's offline table"
"$kubectl" get featureview user-activity -o json >"$state/user-activity.json"
"$FLYWHEEL_BIN_DIR/flywheel-trainer" build-dataset --view "$state/user-activity.json" \
  --events "$state/events/labels.parquet" --out "$state/events/training-set.parquet"

step "kubectl get flywheel"
"$kubectl" get flywheel -o wide
"$kubectl" get modelversion ctr-demo -o jsonpath='{.spec.artifact}{"\n"}{.spec.metrics}{"\n"}'

if [[ -n "$keep" ]]; then
  cat <<EOT

The demo is still running. Try:
  export KUBECONFIG=$kubeconfig
  $kubectl get flywheel
  $kubectl describe trainingjob ctr-demo
  $kubectl get gpuquota ranking-team -o yaml
Operator logs: $state/operator.log
Stop it with:  e2e/scripts/stop-cluster.sh $state --purge
EOT
else
  "$repo/e2e/scripts/stop-cluster.sh" "$state" --purge
fi
