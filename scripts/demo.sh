#!/usr/bin/env bash
# The local end-to-end demo, run as a user runs Flywheel: a fresh control plane on 127.0.0.1 with a real node
# (kubelet, Docker, kube-proxy, cluster DNS), Flywheel's images built here, the operator installed by its Helm
# chart (two pods, leader election, its own ServiceAccount), training storage on a PersistentVolume, every
# manifest of examples/, a parameter-server TrainingJob whose gang runs in containers under a GPUQuota and
# leaves a ModelVersion, a FeatureView materialized into Redis by an operator-scheduled Job and a
# point-in-time training set built from it, a Rollout serving the trained model behind the built-in router under
# generated labeled traffic with a real Prometheus evaluating the chart's alert rules: a second model walks
# 1 → 5 → 20 → 100% and becomes stable, and a model trained on the wrong data is rolled back by its online-AUC
# alert. The Rollout logs what it serves through a Kafka-protocol broker, and a last TrainingJob trains the next
# model on that served traffic. Ends with `kubectl get flywheel`.
#   scripts/demo.sh          run and tear down
#   scripts/demo.sh --keep   leave it running and print how to reach it
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
cd "$repo"
keep=""
[[ "${1:-}" == "--keep" ]] && keep=1

ensure_build_packages
prepare_system
step "building the Flywheel binaries and images"
cargo build --workspace --bins --locked
scripts/build-images.sh --profile dev

state="$FLYWHEEL_CACHE/demo"
"$repo/e2e/scripts/stop-cluster.sh" "$state" --purge
step "starting etcd + kube-apiserver + kube-controller-manager and a node (kubelet, Docker, kube-proxy, DNS)"
owner=()
[[ -z "$keep" ]] && owner=(--owner-pid $$)
kubeconfig="$("$repo/e2e/scripts/start-cluster.sh" "$state" "${owner[@]}" --with-node | tail -n 1)"
export KUBECONFIG="$kubeconfig"
kubectl="$FLYWHEEL_CACHE/kube-v1.20.2/kubectl"
# The node's address: pods reach Redis and Prometheus on the host there.
node_ip=10.244.0.1
# The example GPUQuota places its team's pods on the nodes of its pool.
"$kubectl" label node node1 flywheel.dev/pool=ranking-gpu >/dev/null

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

step "training storage: a PersistentVolume on the node's disk, claimed as flywheel-data"
storage="$state/storage"
mkdir -p "$storage"
chmod 0777 "$storage"
"$kubectl" apply -f - <<EOT
apiVersion: v1
kind: PersistentVolume
metadata: {name: flywheel-data}
spec:
  capacity: {storage: 10Gi}
  accessModes: [ReadWriteMany]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  claimRef: {namespace: default, name: flywheel-data}
  hostPath: {path: "$storage", type: Directory}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: flywheel-data, namespace: default}
spec:
  accessModes: [ReadWriteMany]
  storageClassName: ""
  volumeName: flywheel-data
  resources: {requests: {storage: 10Gi}}
EOT
# Inside every training, materialization and serving pod the claim is mounted here.
mnt=/var/lib/flywheel

step "helm install flywheel charts/flywheel (CRDs, RBAC, the operator: two pods from its image)"
python3 e2e/scripts/helm.py install flywheel charts/flywheel flywheel-system "$kubeconfig" \
  image.pullPolicy=Never training.storageClaim=flywheel-data "training.storagePath=$mnt" >/dev/null
"$kubectl" wait --for condition=established --timeout=60s crd --all
"$kubectl" -n flywheel-system rollout status deployment/flywheel-operator --timeout=180s
"$kubectl" -n flywheel-system get pods -o wide
echo "leader: $("$kubectl" -n flywheel-system get lease flywheel-operator -o jsonpath='{.spec.holderIdentity}')"

step "applying examples/ (the example Rollout and the TrainingJobs on its data are left out: their model and data"
echo "are not on this machine; the demo's own below train on generated data and serve what they trained)"
for manifest in examples/*.yaml; do
  case "$manifest" in
    examples/rollout.yaml | examples/trainingjob-ps.yaml | examples/trainingjob-traffic.yaml) ;;
    *) "$kubectl" apply -f "$manifest" ;;
  esac
done
for kind in featureviews modelversions gpuquotas; do
  "$kubectl" wait --for condition=Ready --timeout=60s "$kind" --all
done

step "generating CTR training data onto the volume"
"$FLYWHEEL_BIN_DIR/flywheel-trainer" generate --rows 100000 --users 2000 --items 400 --buckets 20000 \
  --out "$storage/data"
data="$mnt/data"

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
  checkpoint: {uri: "file://$mnt/checkpoints/", everySteps: 100}
  output: {artifactUri: "file://$mnt/models/"}
  # The ModelVersion it creates is Validated only if it clears these.
  validation:
    gates:
      - {metric: auc, min: 0.6}
      - {metric: calibration, min: 0.9, max: 1.1}
EOT
"$kubectl" wait --for condition=Admitted --timeout=60s trainingjob/ctr-demo
sleep 5
"$kubectl" get pods -l flywheel.dev/training-job=ctr-demo -o wide
step "training for real: the gang's containers (docker ps)"
containers() { # the node's containers of pods in `default` whose pod name matches $1
  "${DOCKER:-docker}" ps --filter label=io.kubernetes.pod.namespace=default \
    --filter label=io.kubernetes.docker.type=container \
    --format '{{.ID}}  {{.Label "io.kubernetes.pod.name"}}/{{.Label "io.kubernetes.container.name"}}  {{.Status}}' \
    | grep -E "$1" || true
}
containers ctr-demo
"$kubectl" wait --for condition=Ready --timeout=600s trainingjob/ctr-demo
"$kubectl" get pods -l flywheel.dev/training-job=ctr-demo

step "a FeatureView materialized into Redis by an operator-scheduled Job"
redis_port=$(free_port)
# Redis stands outside the cluster, as a managed store would; pods reach it on the node's address.
redis-server --port "$redis_port" --bind "127.0.0.1 $node_ip" --protected-mode no --save '' --appendonly no \
  >"$state/redis.log" 2>&1 &
echo $! >>"$state/pids"
"$FLYWHEEL_BIN_DIR/flywheel-trainer" generate-events --events 100000 --users 2000 --labels 20000 \
  --out "$storage/events"
"$kubectl" apply -f - <<EOT
apiVersion: flywheel.dev/v1alpha1
kind: FeatureView
metadata:
  name: user-activity
spec:
  entities: [{name: user, joinKey: user_id, valueType: Int64}]
  source:
    batch: {uri: "file://$mnt/events/events.parquet", timestampField: event_timestamp}
  features:
    - {name: price, valueType: Float64}
    - {name: category, valueType: String}
    - {name: spend_1h, column: price, valueType: Float64, aggregation: {function: sum, window: 1h}}
    - {name: events_1d, column: price, valueType: Int64, aggregation: {function: count, window: 1d}}
    - {name: log_price, column: price, valueType: Float64, transform: {log1p: {}}}
  ttl: 2d
  offline: {uri: "file://$mnt/offline/user-activity"}
  online: {redis: {address: "$node_ip:$redis_port"}}
  materialization: {schedule: "*/5 * * * *"}
EOT
"$kubectl" wait --for condition=Materialized --timeout=180s featureview/user-activity
"$kubectl" get featureview user-activity
"$kubectl" get featureview user-activity -o jsonpath='{.status.lastMaterialization}{"\n"}'
echo "online features of user 42:"
redis-cli -p "$redis_port" hgetall "default/user-activity:42" | paste - -
step "a point-in-time correct training set from the FeatureView's offline table"
# The view's offline table is on the volume; read it where the node keeps it.
"$kubectl" get featureview user-activity -o json | sed "s|file://$mnt/|file://$storage/|g" >"$state/user-activity.json"
"$FLYWHEEL_BIN_DIR/flywheel-trainer" build-dataset --view "$state/user-activity.json" \
  --events "$storage/events/labels.parquet" --out "$storage/events/training-set.parquet"

step "two more models: ctr-v2 (same data, another seed) and ctr-wrong (trained on another market's data)"
# ctr-wrong's own eval set scores as well as the others offline; on this market's traffic it is near random.
"$FLYWHEEL_BIN_DIR/flywheel-trainer" generate --seed 7 --rows 100000 --users 2000 --items 400 --buckets 20000 \
  --out "$storage/data-other-market"
training_job() { # NAME SEED DATA
  "$kubectl" apply -f - <<EOT
apiVersion: flywheel.dev/v1alpha1
kind: TrainingJob
metadata:
  name: $1
spec:
  data:
    dataset: {train: "file://$3/train.parquet", eval: "file://$3/eval.parquet", label: clicked}
  model: {name: ctr, architecture: deepfm, embeddingDim: 8, hiddenLayers: [64, 32]}
  optimizer: {kind: adagrad, learningRate: 0.002, sparseLearningRate: 0.05}
  epochs: 2
  batchSize: 512
  seed: $2
  topology: {single: {}}
  queue: ranking-team
  output: {artifactUri: "file://$mnt/models/"}
  validation:
    gates:
      - {metric: auc, min: 0.6}
      - {metric: auc, baseline: {alias: production}, maxDecrease: 0.02}
EOT
}
training_job ctr-v2 7 "$data"
training_job ctr-wrong 7 "$mnt/data-other-market"
"$kubectl" wait --for condition=Ready --timeout=600s trainingjob/ctr-v2 trainingjob/ctr-wrong
"$kubectl" wait --for condition=Validated --timeout=60s modelversion/ctr-demo modelversion/ctr-v2 modelversion/ctr-wrong
"$kubectl" get modelversions ctr-demo ctr-v2 ctr-wrong

step "a real Prometheus (3.x, with Kubernetes discovery): scrapes the operator and the serving pods, evaluates the chart's alert rules"
# The chart's rules as they are, but judged on the demo's small traffic: a relative AUC drop above 15% (not
# 1%) on ≥ 1000 labeled predictions, for 5 s (not 2 m). At a few hundred labeled requests per second the
# online AUC of a window is only known to a few percent.
sed -e 's/for: 2m/for: 5s/' -e 's/canary > 0.01$/canary > 0.15/' -e 's/canary > 0.005$/canary > 0.05/' \
  charts/flywheel/files/serving-rules.yaml >"$state/serving-rules.yaml"
# Prometheus finds the operator and the serving pods through the API server, as the chart's ServiceMonitor and
# PodMonitor select them.
prometheus="$(e2e/scripts/start-prometheus.sh "$state" "$node_ip" "$state/serving-rules.yaml" | tail -n 1)"

step "a Kafka-protocol broker (tansu) for the clicks and the prediction log"
# Like Redis, it stands outside the cluster; pods reach it on the node's address.
kafka="$node_ip:$(free_port)"
"$FLYWHEEL_CACHE/tansu/bin/tansu" broker --listener-url "tcp://$kafka" --advertised-listener-url "tcp://$kafka" \
  --storage-engine memory://tansu/ >"$state/tansu.log" 2>&1 &
echo $! >>"$state/pids"
for _ in $(seq 1 30); do
  (exec 3<>"/dev/tcp/${kafka%:*}/${kafka#*:}") 2>/dev/null && break
  sleep 1
done
for topic in ctr-clicks ctr-predictions; do
  "$FLYWHEEL_CACHE/tansu/bin/tansu" topic create --broker "tcp://$kafka" --partitions 1 "$topic"
done

step "Rollout ctr: serving ctr-demo behind the router; every prediction logged, the traffic written to the volume"
rollout_manifest() { # MODEL_VERSION
  "$kubectl" apply -f - <<EOT
apiVersion: flywheel.dev/v1alpha1
kind: Rollout
metadata:
  name: ctr
spec:
  modelVersion: $1
  serving: {replicas: 1, maxBatchSize: 64}
  strategy:
    canary:
      steps:
        - setWeight: 1
        - pause: {duration: 10s}
        - setWeight: 5
        - pause: {duration: 10s}
        - setWeight: 20
        - pause: {duration: 30s}
        - setWeight: 100
  analysis:
    prometheus: $prometheus
    interval: 5s
    initialDelay: 5s
    count: 2
    failureLimit: 1
    inconclusiveLimit: 20
    metrics:
      - {name: p99-latency, builtin: latencyP99, max: 0.25}
      - {name: errors, builtin: errorRate, max: 0.01}
  alerts: [FlywheelOnlineAUCDropCritical]
  traffic:
    router: {stickyHeader: x-user-id}
  feedback:
    brokers: ["$kafka"]
    clicksTopic: ctr-clicks
    predictionLogTopic: ctr-predictions
    trafficLog: {uri: "file://$mnt/traffic/ctr", flushInterval: 5s}
EOT
}
# The state a rollout settles in: PHASE [STABLE] [SECONDS].
wait_rollout() {
  local phase stable
  for _ in $(seq 1 "${3:-300}"); do
    phase="$("$kubectl" get rollout ctr -o jsonpath='{.status.phase}')"
    stable="$("$kubectl" get rollout ctr -o jsonpath='{.status.stableVersion}')"
    if [[ "$phase" == "$1" && ( -z "${2:-}" || "$stable" == "$2" ) ]]; then return 0; fi
    sleep 1
  done
  echo "Rollout ctr did not reach $1 ${2:-}; it is $phase (stable $stable):" >&2
  "$kubectl" get rollout ctr -o yaml >&2
  return 1
}
rollout_manifest ctr-demo
wait_rollout Healthy ctr-demo 120
"$kubectl" wait --for condition=Ready --timeout=120s pod -l flywheel.dev/rollout=ctr
"$kubectl" get deployments,services,pods -l flywheel.dev/rollout=ctr -o wide
containers '/(serve|route) '
sleep 3
echo "Prometheus discovered through the API server: $(curl -fsS "$prometheus/api/v1/targets" \
  | python3 -c '
import json, sys
targets = json.load(sys.stdin)["data"]["activeTargets"]
print(", ".join(sorted(t["labels"].get("pod", "?") + " (" + t["labels"]["job"] + ")" for t in targets)))')"
endpoint="$("$kubectl" get service ctr -o jsonpath='{.spec.clusterIP}')"

step "generated labeled traffic to the Rollout's Service (users sticky by x-user-id; clicks on the Kafka topic)"
"$FLYWHEEL_BIN_DIR/flywheel-traffic" --url "http://$endpoint:8080" --model ctr --concurrency 8 \
  --kafka-brokers "$kafka" --clicks-topic ctr-clicks >"$state/traffic.log" 2>&1 &
traffic=$!
echo $traffic >>"$state/pids"
sleep 5
tail -n 2 "$state/traffic.log"

step "ctr-v2 committed to the Rollout (as ArgoCD would sync it): 1 → 5 → 20 → 100%, gated by Prometheus"
"$kubectl" get rollout ctr -w &
watch=$!
rollout_manifest ctr-v2
wait_rollout Healthy ctr-v2 600
kill "$watch" 2>/dev/null || true
"$kubectl" get modelversions ctr-demo ctr-v2 -o custom-columns='NAME:.metadata.name,ALIASES:.status.aliases,SERVED BY:.status.servedBy[*].rollout,ROLE:.status.servedBy[*].role'
"$kubectl" get deployments -l flywheel.dev/rollout=ctr
tail -n 3 "$state/traffic.log"

step "ctr-wrong committed: its online AUC falls far below stable's, the AUC alert fires, the canary goes to 0%"
"$kubectl" get rollout ctr -w &
watch=$!
rollout_manifest ctr-wrong
wait_rollout Degraded "" 600
sleep 1
kill "$watch" 2>/dev/null || true
echo "abort reason: $("$kubectl" get rollout ctr -o jsonpath='{.status.abortReason}')"
# The canary is gone from the rules' inputs once it is rolled back, so look back over the last two minutes.
echo "alerts that fired in Prometheus (last 2 minutes):"
curl -fsS "$prometheus/api/v1/query" \
  --data-urlencode 'query=max_over_time(ALERTS{alertstate="firing"}[2m])' \
  | python3 -c 'import json,sys; [print("  ", r["metric"]) for r in json.load(sys.stdin)["data"]["result"]]'
echo "last online AUC of each version (its labeled window):"
curl -fsS "$prometheus/api/v1/query" \
  --data-urlencode 'query=max by (version) (last_over_time(flywheel_serving_online_auc{model="ctr"}[2m]))' \
  | python3 -c 'import json,sys; [print("  ", r["metric"].get("version"), round(float(r["value"][1]), 4)) for r in json.load(sys.stdin)["data"]["result"]]'
sleep 5
tail -n 2 "$state/traffic.log"

step "the wheel turns: the next model trains on what the Rollout served (its traffic log on the volume)"
"$kubectl" get deployment ctr-traffic-log
echo "the Rollout's TrafficLogged: $("$kubectl" get rollout ctr -o jsonpath='{.status.conditions[?(@.type=="TrafficLogged")].reason}: {.status.conditions[?(@.type=="TrafficLogged")].message}')"
echo "traffic log: $(find "$storage/traffic/ctr/predictions" -name '*.parquet' | wc -l) prediction parts, $(find "$storage/traffic/ctr/clicks" -name '*.parquet' | wc -l) click parts"
"$kubectl" apply -f - <<EOT
apiVersion: flywheel.dev/v1alpha1
kind: TrainingJob
metadata:
  name: ctr-next
spec:
  data:
    servedTraffic: {rollout: ctr, clickWindow: 10s, trainRange: {last: 3m}, evalRange: {last: 30s}}
  model: {name: ctr, architecture: deepfm, embeddingDim: 8, hiddenLayers: [64, 32]}
  optimizer: {kind: adagrad, learningRate: 0.002, sparseLearningRate: 0.05}
  epochs: 2
  batchSize: 512
  topology: {single: {}}
  queue: ranking-team
  output: {artifactUri: "file://$mnt/models/"}
  # A small search: the job's own settings and three draws; the lowest validation log loss is registered.
  tuning:
    trials: 4
    space:
      learningRate: {min: 0.0005, max: 0.01}
      embeddingDim: [4, 8, 16]
      hiddenLayers: [[32], [64, 32]]
  validation:
    gates:
      - {metric: auc, min: 0.6}
EOT
"$kubectl" wait --for condition=Ready --timeout=600s trainingjob/ctr-next
kill "$traffic" 2>/dev/null || true
echo "$("$kubectl" get trainingjob ctr-next -o jsonpath='{.status.conditions[?(@.type=="DatasetBuilt")].message}')"
echo "trials (the registered one is bestTrial $("$kubectl" get trainingjob ctr-next -o jsonpath='{.status.tuning.bestTrial}')):"
"$kubectl" get trainingjob ctr-next -o json | python3 -c '
import json, sys
for t in json.load(sys.stdin)["status"]["tuning"]["trials"]:
    print("  trial %(trial)s: learning rate %(learningRate).4g, embedding %(embeddingDim)s, hidden %(hiddenLayers)s:"
          " validation log loss %(validationLogLoss).4f after %(epochs)s epochs" % t)'

"$kubectl" get modelversion ctr-next -o custom-columns='NAME:.metadata.name,PHASE:.status.phase,AUC:.spec.metrics.auc,SERVED TRAFFIC OF:.spec.lineage.servedTraffic,FROM:.spec.lineage.dataRange.start,TO:.spec.lineage.dataRange.end'

step "kubectl get flywheel"
"$kubectl" get flywheel -o wide
"$kubectl" get modelversion ctr-demo -o jsonpath='{.spec.artifact}{"\n"}{.spec.metrics}{"\n"}'

if [[ -n "$keep" ]]; then
  cat <<EOT

The demo is still running. Try:
  export KUBECONFIG=$kubeconfig
  $kubectl get flywheel
  $kubectl describe trainingjob ctr-demo
  $kubectl get rollout ctr -o yaml
  Prometheus:    $prometheus
  $kubectl get gpuquota ranking-team -o yaml
  $kubectl get pods -A -o wide
Operator logs: $kubectl -n flywheel-system logs deployment/flywheel-operator
Stop it with:  e2e/scripts/stop-cluster.sh $state --purge
EOT
else
  "$repo/e2e/scripts/stop-cluster.sh" "$state" --purge
fi
