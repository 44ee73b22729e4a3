//! The lifecycle on a real node, as a user runs it: the operator installed by the chart (its pod, its
//! ServiceAccount), gangs run by kubelet and Docker from the trainer image with the restricted security
//! context, data, checkpoints and artifacts on a PersistentVolume, gang members finding each other through
//! cluster DNS. A parameter-server gang trains and leaves a ModelVersion; a training container killed with
//! `docker kill` restarts the gang from its checkpoint; an image that cannot be pulled is named in the job's
//! status instead of the job looking like it trains; a trained model is served by a Rollout's serving and
//! router pods (serving image) and answers through the Rollout's Service.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use flywheel_crds::trainingjob::TrainingPhase;
use flywheel_crds::{ModelVersion, TrainingJob};
use flywheel_e2e::cluster::TestCluster;
use flywheel_e2e::fixtures::api_for;
use flywheel_e2e::helm::helm;
use flywheel_e2e::images::image;
use flywheel_e2e::repo_root;
use flywheel_e2e::serving::{HttpClient, rest_body};
use flywheel_e2e::training_jobs::{finished, job_until};
use flywheel_e2e::wait::until;
use flywheel_ml::synthetic::{SyntheticConfig, generate};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod, Service};
use kube::api::{LogParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const TRAINING: Duration = Duration::from_secs(300);
const SETTLE: Duration = Duration::from_secs(90);
/// Where the chart mounts the training storage claim in every training pod.
const STORAGE: &str = "/var/lib/flywheel";
const CLAIM: &str = "flywheel-data";

/// The node's cluster with the operator installed by the chart (once per test binary), training pods
/// mounting the claim `flywheel-data` of their namespace.
async fn operator() -> Result<&'static TestCluster, String> {
    static INSTALLED: tokio::sync::OnceCell<Result<(), String>> =
        tokio::sync::OnceCell::const_new();
    let cluster = TestCluster::with_node()?;
    INSTALLED
        .get_or_init(|| async {
            let chart = repo_root().join("charts/flywheel");
            helm(&[
                "install",
                "flywheel",
                &chart.to_string_lossy(),
                "flywheel-system",
                &cluster.kubeconfig().to_string_lossy(),
                "replicaCount=1",
                "image.pullPolicy=Never",
                &format!("training.storageClaim={CLAIM}"),
                &format!("training.storagePath={STORAGE}"),
            ])
            .map(|_| ())
            .map_err(|e| e.to_string())
        })
        .await
        .clone()?;
    Ok(cluster)
}

struct Setup {
    client: Client,
    namespace: String,
}

/// A namespace with a `flywheel-data` claim bound to a volume of its own on the node, and data generated
/// onto it by a pod of the trainer image (`STORAGE/data`).
async fn setup(prefix: &str, rows: u32) -> Result<Setup, Box<dyn std::error::Error>> {
    let cluster = operator().await?;
    let client = cluster.client().await?;
    let namespace = cluster.namespace_for_pods(&client, prefix).await?;

    // The node's local disk as the volume (removed with the cluster); pods run as 65532, so the directory is
    // open to them.
    let host_dir = cluster.state_dir().join("volumes").join(&namespace);
    std::fs::create_dir_all(&host_dir)?;
    std::fs::set_permissions(&host_dir, std::fs::Permissions::from_mode(0o777))?;
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    volumes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": namespace},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadWriteMany"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": "",
                    "claimRef": {"namespace": namespace, "name": CLAIM},
                    "hostPath": {"path": host_dir.to_string_lossy(), "type": "Directory"}
                }
            }))?,
        )
        .await?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace);
    claims
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": CLAIM},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "",
                    "volumeName": namespace,
                    "resources": {"requests": {"storage": "1Gi"}}
                }
            }))?,
        )
        .await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "generate"},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": false,
                "securityContext": {"runAsNonRoot": true, "runAsUser": 65532},
                "containers": [{
                    "name": "generate",
                    "image": image("flywheel-trainer"),
                    "imagePullPolicy": "Never",
                    "args": ["generate", "--rows", rows.to_string(), "--users", "200", "--items", "50",
                             "--buckets", "1000", "--out", format!("{STORAGE}/data")],
                    "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
                                        "capabilities": {"drop": ["ALL"]}},
                    "volumeMounts": [{"name": "storage", "mountPath": STORAGE}]
                }],
                "volumes": [{"name": "storage", "persistentVolumeClaim": {"claimName": CLAIM}}]
            }
        }))?,
    )
    .await?;
    until("the data to be generated", SETTLE, || {
        let pods = pods.clone();
        async move {
            let pod = pods.get("generate").await.map_err(|e| e.to_string())?;
            match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
                Some("Succeeded") => Ok(()),
                Some("Failed") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await?;
    let generated = pods.get("generate").await?;
    let phase = generated.status.and_then(|s| s.phase);
    if phase.as_deref() != Some("Succeeded") {
        let log = pods.logs("generate", &LogParams::default()).await?;
        return Err(format!("generating data: {phase:?}\n{log}").into());
    }
    Ok(Setup { client, namespace })
}

/// A job over the generated data, writing checkpoints and the model onto the same volume.
fn job(name: &str, topology: Value) -> Value {
    json!({
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "data": {"dataset": {
                "train": format!("file://{STORAGE}/data/train.parquet"),
                "eval": format!("file://{STORAGE}/data/eval.parquet"),
                "label": "clicked",
            }},
            "model": {"name": "ctr", "architecture": "deepfm", "embeddingDim": 8, "hiddenLayers": [32]},
            "optimizer": {"kind": "adagrad", "learningRate": 0.002, "sparseLearningRate": 0.05},
            "epochs": 1, "batchSize": 256, "seed": 7,
            "topology": topology,
            "checkpoint": {"uri": format!("file://{STORAGE}/checkpoints"), "everySteps": 20},
            "backoffLimit": 2,
            "output": {"artifactUri": format!("file://{STORAGE}/models")},
        },
    })
}

async fn create_job(client: &Client, namespace: &str, manifest: &Value) -> TestResult {
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), namespace);
    jobs.create(
        &PostParams::default(),
        &serde_json::from_value(manifest.clone())?,
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_parameter_server_gang_trains_in_containers_and_leaves_a_model_version() -> TestResult {
    let s = setup("ps-node", 20_000).await?;
    let manifest = job(
        "ps-train",
        json!({"parameterServer": {"servers": 2, "workers": 2}}),
    );
    create_job(&s.client, &s.namespace, &manifest).await?;
    let done = job_until(
        &s.client,
        &s.namespace,
        "ps-train",
        "to finish",
        TRAINING,
        finished,
    )
    .await?;
    let status = done.status.clone().unwrap_or_default();
    assert_eq!(status.phase, Some(TrainingPhase::Succeeded), "{status:?}");
    assert_eq!(status.restarts, 0, "{status:?}");

    let versions: Api<ModelVersion> = Api::namespaced(s.client.clone(), &s.namespace);
    let version = versions.get("ps-train").await?;
    assert_eq!(
        version.spec.artifact.uri,
        format!("file://{STORAGE}/models/ps-train/model.fwm")
    );
    assert!(version.spec.metrics.auc.is_some_and(|auc| auc > 0.5));
    Ok(())
}

/// The Docker container of `pod`'s container `container` (the kubelet names and labels it so).
fn container_of(namespace: &str, pod: &str, container: &str) -> Result<String, String> {
    let docker = std::env::var("DOCKER").unwrap_or_else(|_| "docker".to_owned());
    let output = Command::new(docker)
        .args(["ps", "-q"])
        .args([
            "--filter",
            &format!("label=io.kubernetes.pod.namespace={namespace}"),
        ])
        .args(["--filter", &format!("label=io.kubernetes.pod.name={pod}")])
        .args([
            "--filter",
            &format!("label=io.kubernetes.container.name={container}"),
        ])
        .output()
        .map_err(|e| e.to_string())?;
    let id = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if id.is_empty() {
        Err(format!("no running container for {namespace}/{pod}"))
    } else {
        Ok(id)
    }
}

#[tokio::test]
async fn a_training_container_killed_by_docker_restarts_the_gang_from_its_checkpoint() -> TestResult
{
    let s = setup("kill-node", 60_000).await?;
    let mut manifest = job("long-train", json!({"single": {}}));
    manifest["spec"]["epochs"] = json!(60);
    manifest["spec"]["batchSize"] = json!(128);
    manifest["spec"]["checkpoint"]["everySteps"] = json!(200);
    create_job(&s.client, &s.namespace, &manifest).await?;

    // The operator's pod polls the chief's status port over the pod network.
    job_until(
        &s.client,
        &s.namespace,
        "long-train",
        "progress from the chief",
        TRAINING,
        |job| {
            job.status
                .as_ref()
                .and_then(|s| s.progress.as_ref())
                .is_some_and(|p| p.step > 200)
        },
    )
    .await?;
    let namespace = s.namespace.clone();
    let container = until("the trainer's container", SETTLE, || {
        let namespace = namespace.clone();
        async move { container_of(&namespace, "long-train-worker-0", "trainer") }
    })
    .await?;
    let docker = std::env::var("DOCKER").unwrap_or_else(|_| "docker".to_owned());
    let killed = Command::new(docker).args(["kill", &container]).output()?;
    assert!(killed.status.success(), "{killed:?}");

    let restarted = job_until(
        &s.client,
        &s.namespace,
        "long-train",
        "a counted gang restart",
        SETTLE,
        |job| job.status.as_ref().is_some_and(|s| s.restarts == 1),
    )
    .await?;
    let reasons = restarted.status.clone().unwrap_or_default().restart_reasons;
    assert!(
        reasons[0].starts_with("long-train-worker-0 exited 137"),
        "{reasons:?}"
    );
    let done = job_until(
        &s.client,
        &s.namespace,
        "long-train",
        "to finish",
        TRAINING,
        finished,
    )
    .await?;
    let status = done.status.unwrap_or_default();
    assert_eq!(status.phase, Some(TrainingPhase::Succeeded), "{status:?}");
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.namespace);
    let log = pods
        .logs("long-train-worker-0", &LogParams::default())
        .await?;
    assert!(
        log.contains("\"event\":\"resumed\""),
        "the new gang resumed from the checkpoint:\n{log}"
    );
    Ok(())
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_is_named_in_the_jobs_status() -> TestResult {
    let s = setup("bad-image", 2_000).await?;
    let mut manifest = job("missing-image", json!({"single": {}}));
    // A registry on this machine's loopback that nothing serves: the pull fails here, nothing leaves.
    manifest["spec"]["image"] = json!("127.0.0.1:9/flywheel/no-such-trainer:0");
    create_job(&s.client, &s.namespace, &manifest).await?;
    let stuck = job_until(
        &s.client,
        &s.namespace,
        "missing-image",
        "PodsStarted=False",
        SETTLE,
        |job| {
            job.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "PodsStarted" && c.status == "False")
            })
        },
    )
    .await?;
    let status = stuck.status.unwrap_or_default();
    let condition = status
        .conditions
        .iter()
        .find(|c| c.type_ == "PodsStarted")
        .ok_or("no PodsStarted condition")?;
    assert!(
        matches!(
            condition.reason.as_str(),
            "ErrImagePull" | "ImagePullBackOff"
        ),
        "{condition:?}"
    );
    assert!(
        condition.message.contains("missing-image-worker-0"),
        "{condition:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_trained_model_is_served_from_containers_through_the_rollouts_router() -> TestResult {
    let s = setup("serve-node", 20_000).await?;
    create_job(
        &s.client,
        &s.namespace,
        &job("ctr-v1", json!({"single": {}})),
    )
    .await?;
    let done = job_until(
        &s.client,
        &s.namespace,
        "ctr-v1",
        "to finish",
        TRAINING,
        finished,
    )
    .await?;
    let status = done.status.unwrap_or_default();
    assert_eq!(status.phase, Some(TrainingPhase::Succeeded), "{status:?}");

    let rollouts = api_for(&s.client, "Rollout", &s.namespace)?;
    rollouts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "flywheel.dev/v1alpha1", "kind": "Rollout",
                "metadata": {"name": "ctr"},
                "spec": {
                    "modelVersion": "ctr-v1",
                    "serving": {"replicas": 1},
                    "traffic": {"router": {"replicas": 1}},
                },
            }))?,
        )
        .await?;
    until("ctr-v1 to be the stable version", TRAINING, || {
        let rollouts = rollouts.clone();
        async move {
            let rollout = rollouts.get("ctr").await.map_err(|e| e.to_string())?;
            let status = rollout.data.get("status").cloned().unwrap_or_default();
            if status["stableVersion"] == "ctr-v1" {
                Ok(())
            } else {
                Err(status.to_string())
            }
        }
    })
    .await?;

    // Clients call the Rollout's Service: kube-proxy sends them to the router pod, which forwards to the
    // serving pod by its Service's DNS name; the model was read from the claim, mounted read-only.
    let services: Api<Service> = Api::namespaced(s.client.clone(), &s.namespace);
    let cluster_ip: Ipv4Addr = services
        .get("ctr")
        .await?
        .spec
        .and_then(|spec| spec.cluster_ip)
        .ok_or("the Rollout's Service has no ClusterIP")?
        .parse()?;
    let rows = generate(&SyntheticConfig {
        seed: 3,
        rows: 16,
        ..SyntheticConfig::default()
    })
    .impressions;
    let body = rest_body(Some("node"), &rows).to_string().into_bytes();
    let http = HttpClient::default();
    let answer = until("a prediction through the router", SETTLE, || {
        let http = http.clone();
        let body = body.clone();
        async move {
            match http
                .send_to(
                    "POST",
                    SocketAddr::from((cluster_ip, 8080)),
                    "/v2/models/ctr/infer",
                    Some(body),
                    &[("x-user-id", "u-1")],
                )
                .await
            {
                Ok((200, answer)) => Ok(answer),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await?;
    let predictions: Vec<f64> = answer["outputs"][0]["data"]
        .as_array()
        .ok_or_else(|| format!("no outputs in {answer}"))?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert_eq!(predictions.len(), rows.len(), "{answer}");
    assert!(
        predictions.iter().all(|p| *p > 0.0 && *p < 1.0),
        "{predictions:?}"
    );
    Ok(())
}
