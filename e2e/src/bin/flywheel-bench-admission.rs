//! Admission benchmark: N TrainingJobs applied at once against a real kube-apiserver and the real operator
//! (`FLYWHEEL_BIN_DIR`, build it with `--release`). It measures the operator's admission and gang creation:
//! the cluster has no node, so the admitted gangs' pods are created and stay Pending.
//!
//! One GPUQuota of N/2 GPUs; every job is a one-worker data-parallel gang asking for one GPU, so exactly the
//! first N/2 jobs (by creation) must run and the rest wait in order. Prints a table: time until every job is
//! admitted or queued correctly, reconciles per second, and the operator's resident memory.
//!
//!     scripts/bench-admission.sh [JOBS]

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flywheel_crds::trainingjob::TrainingPhase;
use flywheel_crds::{GPUQuota, TrainingJob};
use flywheel_e2e::cluster::TestCluster;
use flywheel_e2e::operator::OperatorProcess;
use futures::StreamExt;
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

/// Creations in flight at once: what `kubectl apply -f dir/` with many files, or ArgoCD, does.
const CONCURRENT_CREATES: usize = 32;
const DEADLINE: Duration = Duration::from_secs(300);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let jobs: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()
        .context("JOBS must be a number")?
        .unwrap_or(1000);
    let gpus = jobs / 2;
    let cluster = TestCluster::shared().map_err(anyhow::Error::msg)?;
    let client = cluster.client().await?;
    let namespace = cluster.namespace(&client, "bench").await?;
    let mut operator =
        OperatorProcess::spawn(cluster, "bench-admission", &["--no-leader-election"])?;
    let quota_name = format!("{namespace}-quota");
    let quota: GPUQuota = serde_json::from_value(json!({
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "GPUQuota",
        "metadata": {"name": quota_name},
        "spec": {
            "namespaces": {"names": [namespace]},
            "limits": [{"resource": "nvidia.com/gpu", "count": gpus}],
        },
    }))?;
    Api::<GPUQuota>::all(client.clone())
        .create(&PostParams::default(), &quota)
        .await?;
    // Let the operator start and settle before the clock starts.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reconciles_before = operator.reconciliations().await?;

    let api: Api<TrainingJob> = Api::namespaced(client.clone(), &namespace);
    let started = Instant::now();
    let names: Vec<String> = (0..jobs).map(|i| format!("job-{i:05}")).collect();
    let created = futures::stream::iter(names.iter().cloned())
        .map(|name| create(api.clone(), name, quota_name.clone()))
        .buffered(CONCURRENT_CREATES)
        .collect::<Vec<_>>()
        .await;
    for result in created {
        result?;
    }
    let applied = started.elapsed();

    let mut peak_rss = 0;
    let settled = loop {
        peak_rss = peak_rss.max(operator.memory_kib("VmRSS")?);
        match correct(&api, gpus, started).await? {
            Ok(elapsed) => break elapsed,
            Err(first_wrong) if started.elapsed() > DEADLINE => {
                bail!("not settled after {DEADLINE:?}; first wrong job: {first_wrong}")
            }
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let reconciles = operator.reconciliations().await? - reconciles_before;
    let high_water = operator.memory_kib("VmHWM")?;
    println!();
    println!(
        "| jobs | GPUs in quota | applied in | all admitted/queued correctly after | reconciles | reconciles/s | operator RSS (peak) |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!(
        "| {jobs} | {gpus} | {:.1} s | {:.1} s | {reconciles} | {:.0} | {:.1} MiB ({:.1} MiB) |",
        applied.as_secs_f64(),
        settled.as_secs_f64(),
        reconciles as f64 / settled.as_secs_f64(),
        peak_rss as f64 / 1024.0,
        high_water as f64 / 1024.0,
    );
    operator.kill();
    Ok(())
}

async fn create(api: Api<TrainingJob>, name: String, queue: String) -> anyhow::Result<()> {
    let job: TrainingJob = serde_json::from_value(json!({
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "data": {"dataset": {"train": "file:///data/train.parquet", "eval": "file:///data/eval.parquet", "label": "clicked"}},
            "model": {"name": "ctr", "architecture": "logistic"},
            "topology": {"dataParallel": {"workers": 1, "gpusPerWorker": 1}},
            "queue": queue,
            "image": "registry.example/bench-trainer:1",
            "output": {"artifactUri": "file:///data/models/"},
        },
    }))?;
    api.create(&PostParams::default(), &job)
        .await
        .with_context(|| format!("creating {}", job.name_any()))?;
    Ok(())
}

/// When exactly `admitted` jobs run with all their pods created and every other job waits, at positions
/// 1, 2, … in creation order (equal priorities): the elapsed time. Which jobs run depends on the order they
/// reached the API server, so it is not checked.
async fn correct(
    api: &Api<TrainingJob>,
    admitted: usize,
    started: Instant,
) -> anyhow::Result<Result<Duration, String>> {
    let jobs = api.list(&ListParams::default()).await?.items;
    let mut running = 0;
    let mut queued = Vec::new();
    for job in &jobs {
        let status = job.status.clone().unwrap_or_default();
        match status.phase {
            Some(TrainingPhase::Running)
                if status.replicas.iter().all(|r| r.active == r.desired) =>
            {
                running += 1;
            }
            Some(TrainingPhase::Queued) => queued.push(job),
            _ => {
                return Ok(Err(format!(
                    "{}: {}",
                    job.name_any(),
                    serde_json::to_string(&job.status)?
                )));
            }
        }
    }
    if running != admitted {
        return Ok(Err(format!("{running} running, want {admitted}")));
    }
    queued.sort_by_key(|job| {
        (
            job.metadata.creation_timestamp.clone().map(|t| t.0),
            job.name_any(),
        )
    });
    for (index, job) in queued.iter().enumerate() {
        let position = job
            .status
            .as_ref()
            .and_then(|s| s.queue.as_ref())
            .and_then(|q| q.position);
        if position != Some(index as u32 + 1) {
            return Ok(Err(format!(
                "{} at {position:?}, want {}",
                job.name_any(),
                index + 1
            )));
        }
    }
    Ok(Ok(started.elapsed()))
}
