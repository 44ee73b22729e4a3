//! GPUQuotas on the real node: the operator installed by the chart admits whole data-parallel gangs in order
//! of priority and creation, queues the rest with the reason, preempts when the quota allows it, refuses
//! namespaces a quota does not cover, and gives gang pods their GPUs, isolation and peers.
//!
//! The node has no GPUs, so no gang pod here is ever scheduled: the scheduler reports them Unschedulable, as it
//! would on any cluster without free GPUs. Quota is freed by deleting jobs; that a finished job frees its GPUs
//! is the admission plan's unit test (`a_finished_job_frees_its_gpus_for_the_next_in_line`).

use std::collections::BTreeMap;
use std::time::Duration;

use flywheel_crds::trainingjob::TrainingPhase;
use flywheel_crds::{GPUQuota, TrainingJob};
use flywheel_e2e::on_node;
use flywheel_e2e::training_jobs::job_until;
use flywheel_e2e::wait::until;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const SETTLE: Duration = Duration::from_secs(60);
/// The garbage collector discovers a newly registered CRD type with some delay, as in a real cluster.
const COLLECTION: Duration = Duration::from_secs(120);

struct Setup {
    client: Client,
    namespace: String,
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

async fn setup(prefix: &str) -> Result<Setup, Box<dyn std::error::Error>> {
    let cluster = on_node::operator(&[]).await?;
    let client = cluster.client().await?;
    ensure_runtime_class(&client).await?;
    let namespace = cluster.namespace_for_pods(&client, prefix).await?;
    Ok(Setup { client, namespace })
}

/// A data-parallel job on GPUs; its data is never read, since its pods never run here.
fn gpu_job(name: &str, queue: &str, gpus_per_worker: u32, priority: i32) -> Value {
    json!({
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "data": {"dataset": {
                "train": "file:///var/lib/flywheel/data/train.parquet",
                "eval": "file:///var/lib/flywheel/data/eval.parquet",
                "label": "clicked",
            }},
            "model": {"name": "ctr", "architecture": "deepfm", "embeddingDim": 8, "hiddenLayers": [32]},
            "epochs": 1, "batchSize": 256, "seed": 7,
            "topology": {"dataParallel": {"workers": 2, "gpusPerWorker": gpus_per_worker,
                         "gpuResource": "nvidia.com/gpu", "gpuType": "NVIDIA-H100-80GB-HBM3"}},
            "output": {"artifactUri": "file:///var/lib/flywheel/models"},
            "queue": queue,
            "priority": priority,
        },
    })
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

#[tokio::test]
async fn a_data_parallel_gpu_gang_gets_gpus_isolation_and_its_peers() -> TestResult {
    let s = setup("gpu").await?;
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
    // The job says why it does not train, in the scheduler's words.
    let job = job_until(
        &s.client,
        &s.namespace,
        "dp",
        "PodsScheduled=False",
        SETTLE,
        |job| {
            job.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "PodsScheduled" && c.status == "False")
            })
        },
    )
    .await?;
    let scheduled = job
        .status
        .unwrap_or_default()
        .conditions
        .into_iter()
        .find(|c| c.type_ == "PodsScheduled")
        .ok_or("no PodsScheduled condition")?;
    assert_eq!(scheduled.reason, "Unschedulable");
    assert!(
        scheduled
            .message
            .starts_with("2 of 2 pods cannot be scheduled; dp-worker-"),
        "{scheduled:?}"
    );
    assert!(
        scheduled.message.contains("nodes are available"),
        "{scheduled:?}"
    );
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
async fn a_quota_admits_whole_gangs_in_order_and_frees_gpus_when_a_job_goes() -> TestResult {
    use TrainingPhase::{Queued, Running};
    let s = setup("quota").await?;
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

    // Deleting a running job removes its pods (garbage collection) and gives its GPUs to `third`.
    Api::<TrainingJob>::namespaced(s.client.clone(), &s.namespace)
        .delete("first", &DeleteParams::default())
        .await?;
    phases_become(
        &s.client,
        &s.namespace,
        &["second", "third"],
        &[Some(Running), Some(Running)],
        SETTLE,
    )
    .await?;
    until("first's pods to be collected", COLLECTION, || async {
        let left = pods_of(&s.client, &s.namespace, "first")
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
    let s = setup("preempt").await?;
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
    let s = setup("uncovered").await?;
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
