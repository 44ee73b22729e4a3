//! TrainingJobs and GPUQuotas end to end: the real operator against a real kube-apiserver, the kubelet stand-in
//! running the real `flywheel-trainer` as the pods' processes. A parameter-server gang trains on generated data
//! and leaves a ModelVersion; quotas admit whole gangs in order and preempt; a killed worker restarts the gang
//! from its checkpoint; a restarted operator picks up where it was.
//!
//! GPU pods cannot run here (the stand-in node has no GPUs); where a quota test needs a gang to finish, the
//! test plays the kubelet for that namespace and reports the pods' ends itself.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use flywheel_crds::trainingjob::TrainingPhase;
use flywheel_crds::{GPUQuota, ModelVersion, TrainingJob};
use flywheel_e2e::cluster::TestCluster;
use flywheel_e2e::kubelet::Kubelet;
use flywheel_e2e::operator::OperatorProcess;
use flywheel_e2e::training_jobs::{job_until, phase};
use flywheel_e2e::wait::until;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const TRAINING: Duration = Duration::from_secs(240);
const SETTLE: Duration = Duration::from_secs(30);
/// The garbage collector discovers a newly registered CRD type with some delay, as in a real cluster.
const COLLECTION: Duration = Duration::from_secs(120);

static OPERATOR: Mutex<Option<OperatorProcess>> = Mutex::new(None);

fn start_operator(cluster: &TestCluster) -> Result<(), String> {
    let mut slot = OPERATOR.lock().map_err(|e| e.to_string())?;
    if slot.is_none() {
        *slot = Some(
            OperatorProcess::spawn(cluster, "training-tests", &["--no-leader-election"])
                .map_err(|e| e.to_string())?,
        );
    }
    Ok(())
}

/// Kills the operator (no chance to clean up) and starts a fresh one.
fn restart_operator(cluster: &TestCluster) -> Result<(), String> {
    let mut slot = OPERATOR.lock().map_err(|e| e.to_string())?;
    if let Some(mut old) = slot.take() {
        old.kill();
    }
    *slot = Some(
        OperatorProcess::spawn(cluster, "training-tests-2", &["--no-leader-election"])
            .map_err(|e| e.to_string())?,
    );
    Ok(())
}

struct Setup {
    cluster: &'static TestCluster,
    client: Client,
    namespace: String,
    work: PathBuf,
}

/// The RuntimeClass the test quotas isolate with; the API server refuses pods naming an unknown one.
async fn ensure_runtime_class(client: &Client) -> Result<(), kube::Error> {
    use k8s_openapi::api::node::v1::RuntimeClass;
    let api: Api<RuntimeClass> = Api::all(client.clone());
    let class: RuntimeClass = serde_json::from_value(json!({
        "apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
        "metadata": {"name": "nvidia"}, "handler": "nvidia",
    }))
    .map_err(kube::Error::SerdeError)?;
    match api.create(&PostParams::default(), &class).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(err) => Err(err),
    }
}

/// A namespace, the operator, and (when `run_pods`) a kubelet stand-in for that namespace.
async fn setup(prefix: &str, run_pods: bool) -> Result<Setup, Box<dyn std::error::Error>> {
    let cluster = TestCluster::shared()?;
    start_operator(cluster)?;
    let client = cluster.client().await?;
    ensure_runtime_class(&client).await?;
    let namespace = cluster.namespace(&client, prefix).await?;
    let work = std::env::temp_dir()
        .join(format!("flywheel-training-{}", std::process::id()))
        .join(&namespace);
    std::fs::create_dir_all(&work)?;
    if run_pods {
        let kubelet = Kubelet::new(client.clone(), flywheel_e2e::bin_dir(), work.join("pods"))
            .in_namespace(&namespace);
        tokio::spawn(kubelet.run());
    }
    Ok(Setup {
        cluster,
        client,
        namespace,
        work,
    })
}

/// Generated CTR data under `dir`: train.parquet, eval.parquet, schema.json.
fn generate(dir: &Path, rows: u32) -> Result<(), Box<dyn std::error::Error>> {
    let output = Command::new(flywheel_e2e::bin_dir().join("flywheel-trainer"))
        .args(["generate", "--rows", &rows.to_string(), "--users", "200"])
        .args(["--items", "50", "--buckets", "1000", "--out"])
        .arg(dir)
        .output()?;
    if !output.status.success() {
        return Err(format!("generate: {}", String::from_utf8_lossy(&output.stderr)).into());
    }
    Ok(())
}

/// A job over the generated data in `data`, writing under `out`.
fn job(name: &str, data: &Path, out: &Path, topology: Value) -> Value {
    json!({
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "data": {"dataset": {
                "train": format!("file://{}/train.parquet", data.display()),
                "eval": format!("file://{}/eval.parquet", data.display()),
                "label": "clicked",
            }},
            "model": {"name": "ctr", "architecture": "deepfm", "embeddingDim": 8, "hiddenLayers": [32]},
            "optimizer": {"kind": "adagrad", "learningRate": 0.002, "sparseLearningRate": 0.05},
            "epochs": 1, "batchSize": 256, "seed": 7,
            "topology": topology,
            "checkpoint": {"uri": format!("file://{}/checkpoints", out.display()), "everySteps": 20},
            "backoffLimit": 2,
            "output": {"artifactUri": format!("file://{}/models", out.display())},
        },
    })
}

fn gpu_job(name: &str, queue: &str, gpus_per_worker: u32, priority: i32) -> Value {
    let mut manifest = job(
        name,
        Path::new("/nonexistent/data"),
        Path::new("/nonexistent/out"),
        json!({"dataParallel": {"workers": 2, "gpusPerWorker": gpus_per_worker, "gpuResource": "nvidia.com/gpu", "gpuType": "NVIDIA-H100-80GB-HBM3"}}),
    );
    manifest["spec"]["queue"] = json!(queue);
    manifest["spec"]["priority"] = json!(priority);
    manifest
}

fn quota(name: &str, namespace: &str, gpus: u32, preemption: &str) -> Value {
    json!({
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "GPUQuota",
        "metadata": {"name": name},
        "spec": {
            "namespaces": {"names": [namespace]},
            "limits": [{"resource": "nvidia.com/gpu", "count": gpus}],
            "preemption": {"policy": preemption},
            "isolation": {
                "nodeSelector": {"flywheel.dev/pool": "ranking-gpu"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "runtimeClassName": "nvidia",
                "exclusiveNodes": true,
            },
        },
    })
}

async fn create_job(
    client: &Client,
    namespace: &str,
    manifest: &Value,
) -> Result<TrainingJob, Box<dyn std::error::Error>> {
    let api: Api<TrainingJob> = Api::namespaced(client.clone(), namespace);
    Ok(api
        .create(
            &PostParams::default(),
            &serde_json::from_value(manifest.clone())?,
        )
        .await?)
}

async fn create_quota(
    client: &Client,
    manifest: &Value,
) -> Result<GPUQuota, Box<dyn std::error::Error>> {
    let api: Api<GPUQuota> = Api::all(client.clone());
    Ok(api
        .create(
            &PostParams::default(),
            &serde_json::from_value(manifest.clone())?,
        )
        .await?)
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
    let s = setup("ps", true).await?;
    let data = s.work.join("data");
    generate(&data, 20_000)?;
    let manifest = job(
        "ps-train",
        &data,
        &s.work,
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
    let on_disk = std::fs::read_to_string(s.work.join("models/ps-train/model.fwm.sha256"))?;
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

/// `pgrep -f pattern` → pids.
fn pids(pattern: &str) -> Vec<i32> {
    Command::new("pgrep")
        .args(["-f", pattern])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_killed_worker_restarts_the_gang_from_its_checkpoint_and_survives_an_operator_restart()
-> TestResult {
    let s = setup("restart", true).await?;
    let data = s.work.join("data");
    generate(&data, 60_000)?;
    let mut manifest = job("long-train", &data, &s.work, json!({"single": {}}));
    // Long enough (about half a minute here) to be killed mid-run.
    manifest["spec"]["epochs"] = json!(60);
    manifest["spec"]["batchSize"] = json!(128);
    manifest["spec"]["checkpoint"]["everySteps"] = json!(200);
    create_job(&s.client, &s.namespace, &manifest).await?;

    // Progress comes from the chief's status endpoint, without pod access to the job.
    let progressing = job_until(
        &s.client,
        &s.namespace,
        "long-train",
        "progress from the chief",
        TRAINING,
        |job| {
            job.status
                .as_ref()
                .and_then(|s| s.progress.as_ref())
                .is_some_and(|p| {
                    p.step > 0 && p.total_steps.is_some() && p.samples_per_second.is_some()
                })
        },
    )
    .await?;
    let before: BTreeMap<String, String> = pods_of(&s.client, &s.namespace, "long-train")
        .await?
        .iter()
        .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
        .collect();
    assert_eq!(before.len(), 1);

    // The operator dies and comes back: the same pods, the status goes on.
    restart_operator(s.cluster)?;
    let step = progressing
        .status
        .as_ref()
        .and_then(|s| s.progress.as_ref())
        .map_or(0, |p| p.step);
    job_until(
        &s.client,
        &s.namespace,
        "long-train",
        "progress after the operator restart",
        TRAINING,
        |job| {
            job.status
                .as_ref()
                .and_then(|s| s.progress.as_ref())
                .is_some_and(|p| p.step > step)
                || phase(job) == Some(TrainingPhase::Succeeded)
        },
    )
    .await?;
    let after: BTreeMap<String, String> = pods_of(&s.client, &s.namespace, "long-train")
        .await?
        .iter()
        .map(|p| (p.name_any(), p.uid().unwrap_or_default()))
        .collect();
    assert_eq!(before, after, "no duplicate or replaced pods");

    // Kill the trainer process: the gang restarts from the checkpoint, counted.
    let marker = format!("{}/pods/{}", s.work.display(), s.namespace);
    let victims: Vec<i32> = until("the trainer process", SETTLE, || async {
        let found = pids("flywheel-trainer train");
        let ours: Vec<i32> = found
            .into_iter()
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/cwd"))
                    .map(|cwd| cwd.starts_with(&marker))
                    .unwrap_or(false)
            })
            .collect();
        if ours.is_empty() {
            Err("none yet".to_owned())
        } else {
            Ok(ours)
        }
    })
    .await?;
    for pid in victims {
        let _ = nix_kill(pid);
    }
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
        reasons[0].starts_with("long-train-worker-0 exited"),
        "{reasons:?}"
    );
    let done = job_until(
        &s.client,
        &s.namespace,
        "long-train",
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
    let status = done.status.unwrap_or_default();
    assert_eq!(status.phase, Some(TrainingPhase::Succeeded), "{status:?}");
    assert_eq!((status.restarts, status.attempt), (1, 1));
    let log = std::fs::read_to_string(
        s.work
            .join("pods")
            .join(&s.namespace)
            .join("long-train-worker-0")
            .join("trainer.log"),
    )?;
    assert!(
        log.contains("\"event\":\"resumed\""),
        "the new gang resumed from the checkpoint"
    );
    Ok(())
}

fn nix_kill(pid: i32) -> std::io::Result<std::process::ExitStatus> {
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
}

#[tokio::test]
async fn exceeding_the_backoff_limit_fails_the_job_with_the_reason() -> TestResult {
    let s = setup("backoff", true).await?;
    let mut manifest = job(
        "broken",
        &s.work.join("no-such-data"),
        &s.work,
        json!({"single": {}}),
    );
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
async fn a_data_parallel_gpu_gang_gets_gpus_isolation_and_its_peers() -> TestResult {
    let s = setup("gpu", true).await?;
    let quota_name = format!("{}-quota", s.namespace);
    create_quota(&s.client, &quota(&quota_name, &s.namespace, 8, "Never")).await?;
    create_job(&s.client, &s.namespace, &gpu_job("dp", &quota_name, 4, 0)).await?;
    let pods = until("the gang's pods", SETTLE, || async {
        let pods = pods_of(&s.client, &s.namespace, "dp")
            .await
            .map_err(|e| e.to_string())?;
        if pods.len() == 2 {
            Ok(pods)
        } else {
            Err(format!("{} pods", pods.len()))
        }
    })
    .await?;
    for pod in &pods {
        let spec = pod.spec.clone().unwrap_or_default();
        let container = &spec.containers[0];
        let resources = container.resources.clone().unwrap_or_default();
        let gpu = |map: Option<
            BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
        >| {
            map.unwrap_or_default()
                .get("nvidia.com/gpu")
                .map(|q| q.0.clone())
        };
        assert_eq!(gpu(resources.limits), Some("4".to_owned()));
        assert_eq!(gpu(resources.requests), Some("4".to_owned()));
        let selector = spec.node_selector.clone().unwrap_or_default();
        assert_eq!(selector["flywheel.dev/pool"], "ranking-gpu");
        assert_eq!(selector["nvidia.com/gpu.product"], "NVIDIA-H100-80GB-HBM3");
        assert_eq!(spec.runtime_class_name.as_deref(), Some("nvidia"));
        // The API server adds its default not-ready/unreachable tolerations beside the quota's.
        assert!(
            spec.tolerations
                .clone()
                .unwrap_or_default()
                .iter()
                .any(|t| {
                    t.key.as_deref() == Some("nvidia.com/gpu")
                        && t.effect.as_deref() == Some("NoSchedule")
                })
        );
        assert!(spec.affinity.and_then(|a| a.pod_anti_affinity).is_some());
        let security = container.security_context.clone().unwrap_or_default();
        assert_eq!(
            (
                security.run_as_non_root,
                security.read_only_root_filesystem,
                security.allow_privilege_escalation
            ),
            (Some(true), Some(true), Some(false))
        );
        let env: BTreeMap<String, String> = container
            .env
            .clone()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|v| Some((v.name, v.value?)))
            .collect();
        assert_eq!(env["FLYWHEEL_WORKERS"], "2");
        assert_eq!(
            env["FLYWHEEL_DP_CHIEF"],
            format!("worker-0.dp.{}.svc:7070", s.namespace)
        );
        assert_eq!(spec.subdomain.as_deref(), Some("dp"));
        // The stand-in node has no GPUs: like a real scheduler, it leaves the pods Pending.
    }
    let pending = until("the pods to be unschedulable here", SETTLE, || async {
        let pods = pods_of(&s.client, &s.namespace, "dp")
            .await
            .map_err(|e| e.to_string())?;
        let reasons: Vec<String> = pods
            .iter()
            .filter_map(|p| {
                p.status
                    .as_ref()?
                    .conditions
                    .as_ref()?
                    .iter()
                    .find(|c| c.type_ == "PodScheduled")?
                    .reason
                    .clone()
            })
            .collect();
        if reasons.len() == 2 && reasons.iter().all(|r| r == "Unschedulable") {
            Ok(reasons)
        } else {
            Err(format!("{reasons:?}"))
        }
    })
    .await?;
    assert_eq!(pending.len(), 2);
    Ok(())
}

/// Plays the kubelet for a gang that cannot run here: every pod ends Succeeded, the chief with a result.
async fn finish_gang(client: &Client, namespace: &str, job: &str) -> TestResult {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let result = json!({
        "event": "done", "rank": 0, "artifact": format!("/models/{job}/model.fwm"),
        "sha256": "a".repeat(64), "featureSchemaHash": "b".repeat(64),
        "metrics": {"auc": 0.7, "gauc": 0.6, "logLoss": 0.5, "calibration": 1.0, "samples": 100},
        "steps": 10, "samplesPerSecond": 1000.0,
    });
    for pod in pods_of(client, namespace, job).await? {
        let message = if pod.name_any().ends_with("worker-0") {
            result.to_string()
        } else {
            String::new()
        };
        let status = json!({"status": {"phase": "Succeeded", "containerStatuses": [{
            "name": "trainer", "image": "flywheel-trainer", "imageID": "", "ready": false, "restartCount": 0,
            "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": message}},
        }]}});
        pods.patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&status),
        )
        .await?;
    }
    Ok(())
}

async fn phases(
    client: &Client,
    namespace: &str,
    names: &[&str],
) -> Result<Vec<Option<TrainingPhase>>, kube::Error> {
    let api: Api<TrainingJob> = Api::namespaced(client.clone(), namespace);
    let mut found = Vec::new();
    for name in names {
        found.push(api.get(name).await?.status.and_then(|s| s.phase));
    }
    Ok(found)
}

async fn phases_become(
    client: &Client,
    namespace: &str,
    names: &[&str],
    want: &[Option<TrainingPhase>],
    limit: Duration,
) -> TestResult {
    until(&format!("{names:?} to be {want:?}"), limit, || async {
        let got = phases(client, namespace, names)
            .await
            .map_err(|e| e.to_string())?;
        if got == want {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_quota_admits_whole_gangs_in_order_and_frees_gpus_when_jobs_end() -> TestResult {
    use TrainingPhase::{Queued, Running, Succeeded};
    // No kubelet: this test reports the pods' ends itself.
    let s = setup("quota", false).await?;
    let quota_name = format!("{}-quota", s.namespace);
    create_quota(&s.client, &quota(&quota_name, &s.namespace, 8, "Never")).await?;
    for name in ["first", "second", "third"] {
        create_job(&s.client, &s.namespace, &gpu_job(name, &quota_name, 2, 0)).await?;
        // Creation order decides among equal priorities.
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let names = ["first", "second", "third"];
    phases_become(
        &s.client,
        &s.namespace,
        &names,
        &[Some(Running), Some(Running), Some(Queued)],
        SETTLE,
    )
    .await?;
    assert!(
        pods_of(&s.client, &s.namespace, "third").await?.is_empty(),
        "no pod before admission"
    );
    let third = Api::<TrainingJob>::namespaced(s.client.clone(), &s.namespace)
        .get("third")
        .await?;
    let queue = third
        .status
        .and_then(|s| s.queue)
        .unwrap_or_else(|| panic!("no queue status"));
    assert_eq!(queue.position, Some(1));
    assert_eq!(queue.reason, "waiting for 4 nvidia.com/gpu: 8 of 8 in use");
    let quota = Api::<GPUQuota>::all(s.client.clone())
        .get(&quota_name)
        .await?;
    let used = quota.status.unwrap_or_default();
    assert_eq!((used.admitted_count, used.queued_count), (2, 1));
    assert_eq!(used.used_summary.as_deref(), Some("nvidia.com/gpu 8/8"));

    // `first` finishes: its GPUs go to `third`.
    finish_gang(&s.client, &s.namespace, "first").await?;
    phases_become(
        &s.client,
        &s.namespace,
        &names,
        &[Some(Succeeded), Some(Running), Some(Running)],
        SETTLE,
    )
    .await?;
    assert!(
        Api::<ModelVersion>::namespaced(s.client.clone(), &s.namespace)
            .get_opt("first")
            .await?
            .is_some()
    );

    // Deleting a running job removes its pods (garbage collection) and frees its quota.
    create_job(
        &s.client,
        &s.namespace,
        &gpu_job("fourth", &quota_name, 2, 0),
    )
    .await?;
    phases_become(
        &s.client,
        &s.namespace,
        &["fourth"],
        &[Some(Queued)],
        SETTLE,
    )
    .await?;
    Api::<TrainingJob>::namespaced(s.client.clone(), &s.namespace)
        .delete("second", &DeleteParams::default())
        .await?;
    phases_become(
        &s.client,
        &s.namespace,
        &["fourth"],
        &[Some(Running)],
        SETTLE,
    )
    .await?;
    until("second's pods to be collected", COLLECTION, || async {
        let left = pods_of(&s.client, &s.namespace, "second")
            .await
            .map_err(|e| e.to_string())?;
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{} pods", left.len()))
        }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_higher_priority_job_preempts_when_the_quota_allows_it() -> TestResult {
    use TrainingPhase::{Queued, Running};
    let s = setup("preempt", false).await?;
    let quota_name = format!("{}-quota", s.namespace);
    create_quota(
        &s.client,
        &quota(&quota_name, &s.namespace, 8, "LowerPriority"),
    )
    .await?;
    for name in ["low-a", "low-b"] {
        create_job(&s.client, &s.namespace, &gpu_job(name, &quota_name, 2, 0)).await?;
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    phases_become(
        &s.client,
        &s.namespace,
        &["low-a", "low-b"],
        &[Some(Running), Some(Running)],
        SETTLE,
    )
    .await?;
    let victim_pods = gang_of(&s.client, &s.namespace, "low-b", 2).await?.len();
    assert_eq!(victim_pods, 2);
    create_job(
        &s.client,
        &s.namespace,
        &gpu_job("urgent", &quota_name, 2, 100),
    )
    .await?;
    phases_become(
        &s.client,
        &s.namespace,
        &["low-a", "low-b", "urgent"],
        &[Some(Running), Some(Queued), Some(Running)],
        SETTLE,
    )
    .await?;
    let victim = Api::<TrainingJob>::namespaced(s.client.clone(), &s.namespace)
        .get("low-b")
        .await?;
    let status = victim.status.unwrap_or_default();
    assert_eq!(
        status.queue.map(|q| q.reason),
        Some(format!(
            "preempted by {}/urgent (priority 100); waiting for 4 nvidia.com/gpu: 8 of 8 in use",
            s.namespace
        ))
    );
    assert_eq!(status.restarts, 0, "preemption is not a failure");
    until("the victim's pods to go", SETTLE, || async {
        let left = pods_of(&s.client, &s.namespace, "low-b")
            .await
            .map_err(|e| e.to_string())?;
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{} pods", left.len()))
        }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_gpu_job_in_a_namespace_its_quota_does_not_cover_is_refused() -> TestResult {
    let s = setup("uncovered", false).await?;
    let quota_name = format!("{}-quota", s.namespace);
    create_quota(
        &s.client,
        &quota(&quota_name, "some-other-namespace", 8, "Never"),
    )
    .await?;
    create_job(
        &s.client,
        &s.namespace,
        &gpu_job("outsider", &quota_name, 1, 0),
    )
    .await?;
    let job = job_until(
        &s.client,
        &s.namespace,
        "outsider",
        "refused",
        SETTLE,
        |job| {
            job.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Admitted" && c.reason == "NotAdmissible")
            })
        },
    )
    .await?;
    let message = job
        .status
        .unwrap_or_default()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "Admitted")
        .map(|c| c.message)
        .unwrap_or_default();
    assert_eq!(
        message,
        format!(
            "namespace `{}` is not covered by GPUQuota `{quota_name}`",
            s.namespace
        )
    );
    assert!(
        pods_of(&s.client, &s.namespace, "outsider")
            .await?
            .is_empty()
    );
    Ok(())
}
