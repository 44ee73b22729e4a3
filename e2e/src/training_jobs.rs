//! Waiting on a TrainingJob's status in tests.

use std::time::Duration;

use flywheel_crds::TrainingJob;
use flywheel_crds::trainingjob::TrainingPhase;
use kube::{Api, Client};

use crate::wait::{Timeout, until};

/// Polls the job until its status satisfies `check`; returns that job. On timeout, the last status says why.
pub async fn job_until(
    client: &Client,
    namespace: &str,
    name: &str,
    what: &str,
    limit: Duration,
    check: impl Fn(&TrainingJob) -> bool,
) -> Result<TrainingJob, Timeout> {
    let api: Api<TrainingJob> = Api::namespaced(client.clone(), namespace);
    until(&format!("{name}: {what}"), limit, || async {
        let job = api.get(name).await.map_err(|e| e.to_string())?;
        if check(&job) {
            Ok(job)
        } else {
            Err(serde_json::to_string(&job.status).unwrap_or_default())
        }
    })
    .await
}

pub fn phase(job: &TrainingJob) -> Option<TrainingPhase> {
    job.status.as_ref().and_then(|s| s.phase)
}

/// Whether the job has ended, either way.
pub fn finished(job: &TrainingJob) -> bool {
    matches!(
        phase(job),
        Some(TrainingPhase::Succeeded | TrainingPhase::Failed)
    )
}
