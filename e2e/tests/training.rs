//! TrainingJobs on the real node, as a user runs them: the operator installed by the chart (its pod, its
//! ServiceAccount), gangs run by kubelet and Docker from the trainer image with the restricted security
//! context, data, checkpoints and artifacts on a PersistentVolume, gang members finding each other through
//! cluster DNS. A parameter-server gang trains and leaves a ModelVersion carrying what its chief reported; a
//! training container killed with `docker kill` restarts the gang from its checkpoint, and a killed operator
//! container picks up where it was; a job past its backoff limit fails with the reason; an image that cannot
//! be pulled is named in the job's status instead of the job looking like it trains. A data-parallel gang on
//! CPUs allowed 100 epochs of a small table stops early, keeps its best epoch, calibrates, and says so.

use std::collections::BTreeMap;
use std::time::Duration;

use flywheel_crds::trainingjob::TrainingPhase;
use flywheel_crds::{ModelVersion, TrainingJob};
use flywheel_e2e::on_node::{
    self, STORAGE, container_of, docker_kill, generate_training_data, namespace_with_storage,
};
use flywheel_e2e::training_jobs::{finished, job_until, phase};
use flywheel_e2e::wait::until;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, ListParams, LogParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const TRAINING: Duration = Duration::from_secs(300);
const SETTLE: Duration = Duration::from_secs(90);

struct Setup {
    client: Client,
    namespace: String,
    /// The namespace's volume as this machine sees it.
    storage: std::path::PathBuf,
}

/// A namespace with its training storage and, when `rows > 0`, that many rows of generated data on it.
async fn setup(prefix: &str, rows: u32) -> Result<Setup, Box<dyn std::error::Error>> {
    let cluster = on_node::operator(&[]).await?;
    let client = cluster.client().await?;
    let (namespace, storage) = namespace_with_storage(cluster, &client, prefix).await?;
    if rows > 0 {
        generate_training_data(&client, &namespace, rows).await?;
    }
    Ok(Setup {
        client,
        namespace,
        storage,
    })
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

/// The job's pods once at least `count` exist (status is written before the pods are created).
async fn gang_of(
    client: &Client,
    namespace: &str,
    job: &str,
    count: usize,
) -> Result<Vec<Pod>, flywheel_e2e::wait::Timeout> {
    until(&format!("{job}'s {count} pods"), SETTLE, || async {
        let pods = pods_of(client, namespace, job)
            .await
            .map_err(|e| e.to_string())?;
        if pods.len() >= count {
            Ok(pods)
        } else {
            Err(format!("{} pods", pods.len()))
        }
    })
    .await
}

async fn pods_of(client: &Client, namespace: &str, job: &str) -> Result<Vec<Pod>, kube::Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    Ok(pods
        .list(&ListParams::default().labels(&format!("flywheel.dev/training-job={job}")))
        .await?
        .items)
}

fn termination_message(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .terminated
        .as_ref()?
        .message
        .clone()
}

#[tokio::test]
async fn a_parameter_server_gang_trains_for_real_and_leaves_a_model_version() -> TestResult {
    let s = setup("ps", 20_000).await?;
    let manifest = job(
        "ps-train",
        json!({"parameterServer": {"servers": 2, "workers": 2}}),
    );
    create_job(&s.client, &s.namespace, &manifest).await?;
    let running = job_until(
        &s.client,
        &s.namespace,
        "ps-train",
        "Running",
        SETTLE,
        |job| {
            matches!(
                phase(job),
                Some(TrainingPhase::Running | TrainingPhase::Succeeded)
            )
        },
    )
    .await?;
    let replicas = running.status.clone().unwrap_or_default().replicas;
    assert_eq!(
        replicas
            .iter()
            .map(|r| (r.role.as_str(), r.desired))
            .collect::<Vec<_>>(),
        [("worker", 2), ("server", 2)]
    );
    let pods = gang_of(&s.client, &s.namespace, "ps-train", 4).await?;
    assert_eq!(
        pods.len(),
        4,
        "2 parameter servers and 2 workers, all at once"
    );
    // The shards' RPC port is the gang's alone (the test node's network plugin does not enforce it; a
    // cluster's does).
    let policy = Api::<NetworkPolicy>::namespaced(s.client.clone(), &s.namespace)
        .get("ps-train-gang")
        .await?;
    let spec = policy.spec.unwrap_or_default();
    let gang = Some(BTreeMap::from([(
        "flywheel.dev/training-job".to_owned(),
        "ps-train".to_owned(),
    )]));
    assert_eq!(spec.pod_selector.and_then(|s| s.match_labels), gang);
    let rpc_sources: Vec<_> = spec
        .ingress
        .unwrap_or_default()
        .into_iter()
        .filter(|rule| {
            rule.ports.iter().flatten().any(|p| {
                p.port == Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(7070))
            })
        })
        .flat_map(|rule| rule.from.unwrap_or_default())
        .map(|peer| peer.pod_selector.and_then(|s| s.match_labels))
        .collect();
    assert_eq!(
        rpc_sources,
        [gang],
        "only the gang's members reach port 7070"
    );

    let done = job_until(
        &s.client,
        &s.namespace,
        "ps-train",
        "Succeeded",
        TRAINING,
        |job| {
            matches!(
                phase(job),
                Some(TrainingPhase::Succeeded | TrainingPhase::Failed)
            )
        },
    )
    .await?;
    let status = done.status.clone().unwrap_or_default();
    assert_eq!(status.phase, Some(TrainingPhase::Succeeded), "{status:?}");
    let version_name = status.model_version.clone().unwrap_or_default();
    assert_eq!(version_name, "ps-train");

    // The registry entry carries exactly what the chief reported.
    let chief = Api::<Pod>::namespaced(s.client.clone(), &s.namespace)
        .get("ps-train-worker-0")
        .await?;
    let result: Value = serde_json::from_str(&termination_message(&chief).unwrap_or_default())?;
    let versions: Api<ModelVersion> = Api::namespaced(s.client.clone(), &s.namespace);
    let version = versions.get(&version_name).await?;
    assert_eq!(
        version.spec.artifact.sha256,
        result["sha256"].as_str().unwrap_or_default()
    );
    assert_eq!(
        version.spec.artifact.uri,
        format!("file://{}", result["artifact"].as_str().unwrap_or_default())
    );
    assert_eq!(version.spec.metrics.auc, result["metrics"]["auc"].as_f64());
    assert_eq!(
        version.spec.metrics.log_loss,
        result["metrics"]["logLoss"].as_f64()
    );
    assert_eq!(
        status.metrics.as_ref().and_then(|m| m.auc),
        result["metrics"]["auc"].as_f64()
    );
    assert!(
        version.spec.metrics.auc.unwrap_or_default() > 0.55,
        "it learned: {:?}",
        version.spec.metrics
    );
    assert!(
        version.metadata.owner_references.is_none(),
        "the registry entry outlives the job"
    );
    let on_disk = std::fs::read_to_string(s.storage.join("models/ps-train/model.fwm.sha256"))?;
    assert!(
        on_disk.starts_with(&version.spec.artifact.sha256),
        "{on_disk}"
    );

    // Parameter servers never linger.
    until("the parameter servers to be gone", SETTLE, || async {
        let pods = pods_of(&s.client, &s.namespace, "ps-train")
            .await
            .map_err(|e| e.to_string())?;
        let servers: Vec<String> = pods
            .iter()
            .filter(|p| p.labels().get("flywheel.dev/role").map(String::as_str) == Some("server"))
            .map(|p| p.name_any())
            .collect();
        if servers.is_empty() {
            Ok(())
        } else {
            Err(format!("{servers:?}"))
        }
    })
    .await?;

    // The job's deletion leaves the registry entry behind.
    Api::<TrainingJob>::namespaced(s.client.clone(), &s.namespace)
        .delete("ps-train", &DeleteParams::default())
        .await?;
    until("the job to be gone", SETTLE, || async {
        match Api::<TrainingJob>::namespaced(s.client.clone(), &s.namespace)
            .get_opt("ps-train")
            .await
        {
            Ok(None) => Ok(()),
            other => Err(format!("{:?}", other.map(|j| j.map(|j| j.status)))),
        }
    })
    .await?;
    assert!(versions.get_opt(&version_name).await?.is_some());
    Ok(())
}

#[tokio::test]
async fn a_data_parallel_gang_on_cpus_all_reduces_between_pods_and_leaves_a_model_version()
-> TestResult {
    let s = setup("dp-cpu", 20_000).await?;
    let mut manifest = job(
        "dp-train",
        json!({"dataParallel": {"workers": 2, "gpusPerWorker": 0}}),
    );
    // Up to 100 epochs of a small table: early stopping (on by default) ends it within a few, both ranks
    // deciding together, and the kept model is calibrated on the held-out rows.
    manifest["spec"]["epochs"] = json!(100);
    create_job(&s.client, &s.namespace, &manifest).await?;
    let pods = gang_of(&s.client, &s.namespace, "dp-train", 2).await?;
    for pod in &pods {
        let resources = pod
            .spec
            .as_ref()
            .and_then(|spec| spec.containers[0].resources.clone())
            .unwrap_or_default();
        assert!(
            !resources
                .limits
                .unwrap_or_default()
                .contains_key("nvidia.com/gpu"),
            "a CPU gang asks for no GPU"
        );
    }
    let done = job_until(
        &s.client,
        &s.namespace,
        "dp-train",
        "to finish",
        TRAINING,
        finished,
    )
    .await?;
    let status = done.status.clone().unwrap_or_default();
    assert_eq!(status.phase, Some(TrainingPhase::Succeeded), "{status:?}");
    assert_eq!(status.restarts, 0, "{status:?}");
    let version = Api::<ModelVersion>::namespaced(s.client.clone(), &s.namespace)
        .get("dp-train")
        .await?;
    assert!(
        version.spec.metrics.auc.unwrap_or_default() > 0.55,
        "it learned: {:?}",
        version.spec.metrics
    );
    let convergence = status.convergence.clone().ok_or("no status.convergence")?;
    assert!(
        convergence.stopped_early && convergence.epochs_trained < 100,
        "{convergence:?}"
    );
    assert_eq!(
        convergence.best_epoch,
        Some(convergence.epochs_trained - 2),
        "patience 2: training ends two epochs after the best, whose weights are kept"
    );
    let calibration = version.spec.metrics.calibration.unwrap_or_default();
    assert!(
        version.spec.metrics.uncalibrated_calibration.is_some() && (calibration - 1.0).abs() < 0.1,
        "calibrated on held-out rows, recorded before and after: {:?}",
        version.spec.metrics
    );
    let events: Api<Event> = Api::namespaced(s.client.clone(), &s.namespace);
    let stopped = until("a StoppedEarly event", SETTLE, || {
        let events = events.clone();
        async move {
            events
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some("StoppedEarly")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("dp-train")
                })
                .ok_or_else(|| "no event yet".to_owned())
        }
    })
    .await?;
    assert!(
        stopped.note.unwrap_or_default().contains(&format!(
            "trained {} of 100 epochs",
            convergence.epochs_trained
        )),
        "the event says how far it trained"
    );
    // Both ranks trained to the end of the chief's all-reduce.
    let peer_log = Api::<Pod>::namespaced(s.client.clone(), &s.namespace)
        .logs("dp-train-worker-1", &LogParams::default())
        .await?;
    assert!(
        peer_log.contains("\"event\":\"done\",\"rank\":1"),
        "rank 1 trained to the end:\n{peer_log}"
    );
    Ok(())
}

#[tokio::test]
async fn a_training_container_killed_by_docker_restarts_the_gang_from_its_checkpoint() -> TestResult
{
    let s = setup("kill-node", 60_000).await?;
    let mut manifest = job("long-train", json!({"single": {}}));
    // Long enough to be killed twice on any machine: every epoch (not early stopping's few), on a quarter of a
    // core (the kubelet enforces the limit), so the run lasts minutes however fast the CPU.
    manifest["spec"]["epochs"] = json!(150);
    manifest["spec"]["earlyStopping"] = json!({"patience": 0});
    manifest["spec"]["resources"] = json!({"worker": {"limits": {"cpu": "250m"}}});
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
    let pods_now = || async {
        pods_of(&s.client, &s.namespace, "long-train")
            .await
            .map(|pods| {
                pods.iter()
                    .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
                    .collect::<BTreeMap<_, _>>()
            })
    };
    let before = pods_now().await?;
    assert_eq!(before.len(), 1);

    // The operator's container is killed: the kubelet restarts it, and it picks up the same gang.
    let operator_pod = on_node::operator_pods(&s.client)
        .await?
        .first()
        .map(ResourceExt::name_any)
        .ok_or("no operator pod")?;
    let operator = until("the operator's container", SETTLE, || {
        let operator_pod = operator_pod.clone();
        async move { container_of(on_node::RELEASE_NAMESPACE, &operator_pod, "operator") }
    })
    .await?;
    docker_kill(&operator)?;
    until("the operator's container to be restarted", SETTLE, || {
        let client = s.client.clone();
        let operator_pod = operator_pod.clone();
        async move {
            let pods: Api<Pod> = Api::namespaced(client, on_node::RELEASE_NAMESPACE);
            let pod = pods.get(&operator_pod).await.map_err(|e| e.to_string())?;
            let status = pod
                .status
                .and_then(|s| s.container_statuses)
                .and_then(|c| c.into_iter().next())
                .ok_or("no container status")?;
            if status.restart_count >= 1 && status.ready {
                Ok(())
            } else {
                Err(format!(
                    "restarts {}, ready {}",
                    status.restart_count, status.ready
                ))
            }
        }
    })
    .await?;
    let step = Api::<TrainingJob>::namespaced(s.client.clone(), &s.namespace)
        .get("long-train")
        .await?
        .status
        .and_then(|s| s.progress)
        .map_or(0, |p| p.step);
    job_until(
        &s.client,
        &s.namespace,
        "long-train",
        "progress reported by the restarted operator",
        TRAINING,
        |job| {
            job.status
                .as_ref()
                .and_then(|s| s.progress.as_ref())
                .is_some_and(|p| p.step > step)
        },
    )
    .await?;
    assert_ne!(
        container_of(on_node::RELEASE_NAMESPACE, &operator_pod, "operator")?,
        operator,
        "the operator runs in a new container"
    );
    assert_eq!(before, pods_now().await?, "no duplicate or replaced pods");

    // The trainer's container is killed: the gang restarts from its checkpoint, counted.
    let namespace = s.namespace.clone();
    let container = until("the trainer's container", SETTLE, || {
        let namespace = namespace.clone();
        async move { container_of(&namespace, "long-train-worker-0", "trainer") }
    })
    .await?;
    docker_kill(&container)?;

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
async fn exceeding_the_backoff_limit_fails_the_job_with_the_reason() -> TestResult {
    let s = setup("backoff", 0).await?;
    let mut manifest = job("broken", json!({"single": {}}));
    manifest["spec"]["data"]["dataset"]["train"] =
        json!(format!("file://{STORAGE}/no-such-data/train.parquet"));
    manifest["spec"]["backoffLimit"] = json!(1);
    create_job(&s.client, &s.namespace, &manifest).await?;
    let failed = job_until(
        &s.client,
        &s.namespace,
        "broken",
        "Failed",
        TRAINING,
        |job| phase(job) == Some(TrainingPhase::Failed),
    )
    .await?;
    let status = failed.status.unwrap_or_default();
    assert_eq!(status.restarts, 1);
    let message = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .map(|c| c.message.clone())
        .unwrap_or_default();
    assert!(
        message.starts_with("backoffLimit (1) reached: broken-worker-0 exited 1:"),
        "{message}"
    );
    assert!(message.contains("no-such-data"), "{message}");
    Ok(())
}

#[tokio::test]
async fn an_image_that_cannot_be_pulled_is_named_in_the_jobs_status() -> TestResult {
    let s = setup("bad-image", 2_000).await?;
    let mut manifest = job("missing-image", json!({"single": {}}));
    // A registry on this machine's loopback that nothing serves: the pull fails here, nothing leaves.
    manifest["spec"]["image"] = json!("127.0.0.1:9/flywheel/no-such-trainer:0");
    manifest["spec"]["startTimeout"] = json!("20s");
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
    // Nothing will change without a fix: past spec.startTimeout the job fails and its pods go.
    let failed = job_until(
        &s.client,
        &s.namespace,
        "missing-image",
        "Failed after the start timeout",
        SETTLE,
        |job| {
            job.status
                .as_ref()
                .is_some_and(|s| s.phase == Some(TrainingPhase::Failed))
        },
    )
    .await?;
    let failure = failed
        .status
        .unwrap_or_default()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Failed")
        .ok_or("no Failed condition")?;
    assert!(
        failure.message.contains("spec.startTimeout (20s)"),
        "{failure:?}"
    );
    until("the job's pods to be gone", SETTLE, || async {
        let pods = pods_of(&s.client, &s.namespace, "missing-image")
            .await
            .map_err(|e| e.to_string())?;
        pods.is_empty()
            .then_some(())
            .ok_or(format!("{} pods left", pods.len()))
    })
    .await?;
    Ok(())
}
