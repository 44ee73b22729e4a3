//! Which TrainingJobs a change elsewhere concerns, as pure functions over the cached objects.

use std::sync::Arc;

use flywheel_crds::trainingjob::TrainingPhase;
use flywheel_crds::{GPUQuota, TrainingJob};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;

use crate::gpuquota::{Standing, standing};

/// The jobs a quota's new decision changes something for: admitted but not started, or queued at another
/// place or for another reason than their status says. Re-reconciling every job of a busy quota on each of its
/// status updates would cost O(jobs) reconciles per admission.
pub fn jobs_of_quota(jobs: &[Arc<TrainingJob>], quota: &GPUQuota) -> Vec<ObjectRef<TrainingJob>> {
    let name = quota.name_any();
    jobs.iter()
        .filter(|job| job.spec.queue.as_deref() == Some(name.as_str()))
        .filter(|job| decision_changes(job, quota))
        .map(|job| ObjectRef::from_obj(job.as_ref()))
        .collect()
}

fn decision_changes(job: &TrainingJob, quota: &GPUQuota) -> bool {
    let status = job.status.clone().unwrap_or_default();
    let standing = standing(
        quota.status.as_ref(),
        &job.namespace().unwrap_or_default(),
        &job.name_any(),
        &job.uid().unwrap_or_default(),
    );
    match standing {
        Standing::Admitted => {
            matches!(status.phase, None | Some(TrainingPhase::Queued))
        }
        Standing::Queued { reason, position } => {
            status.phase != Some(TrainingPhase::Queued)
                || status
                    .queue
                    .is_none_or(|queue| queue.reason != reason || queue.position != Some(position))
        }
        Standing::Rejected { reason } => status.queue.is_none_or(|queue| queue.reason != reason),
        // Not decided yet, or no longer considered (finished, suspended): nothing new for the job.
        Standing::Undecided => status.phase.is_none(),
    }
}

#[cfg(test)]
mod tests {
    use flywheel_crds::gpuquota::{GPUQuotaStatus, JobRef};
    use flywheel_crds::trainingjob::{QueueStatus, TrainingJobStatus};

    use super::*;
    use crate::plan::examples::load;

    fn job(
        name: &str,
        phase: Option<TrainingPhase>,
        queue: Option<(&str, u32)>,
    ) -> Arc<TrainingJob> {
        let mut job: TrainingJob = load("trainingjob-gpu.yaml", 1);
        job.metadata.name = Some(name.into());
        job.metadata.namespace = Some("ml".into());
        job.status = Some(TrainingJobStatus {
            phase,
            queue: queue.map(|(reason, position)| QueueStatus {
                reason: reason.into(),
                position: Some(position),
                since: None,
            }),
            ..TrainingJobStatus::default()
        });
        Arc::new(job)
    }

    fn entry(name: &str, reason: Option<&str>) -> JobRef {
        JobRef {
            namespace: "ml".into(),
            name: name.into(),
            uid: None,
            reason: reason.map(Into::into),
        }
    }

    fn names(refs: Vec<ObjectRef<TrainingJob>>) -> Vec<String> {
        refs.into_iter().map(|r| r.name).collect()
    }

    #[test]
    fn a_quota_decision_wakes_only_the_jobs_whose_standing_it_changes() {
        let mut quota: GPUQuota = load("gpuquota.yaml", 1);
        quota.status = Some(GPUQuotaStatus {
            admitted: vec![entry("admitted-queued", None), entry("running", None)],
            queued: vec![
                entry("moved-up", Some("quota full")),
                entry("same-place", Some("quota full")),
            ],
            ..GPUQuotaStatus::default()
        });
        let mut elsewhere = (*job("other-quota", None, None)).clone();
        elsewhere.spec.queue = Some("another-team".into());
        let jobs = vec![
            job(
                "admitted-queued",
                Some(TrainingPhase::Queued),
                Some(("quota full", 1)),
            ),
            job("running", Some(TrainingPhase::Running), None),
            job(
                "moved-up",
                Some(TrainingPhase::Queued),
                Some(("quota full", 2)),
            ),
            job(
                "same-place",
                Some(TrainingPhase::Queued),
                Some(("quota full", 2)),
            ),
            job("new", None, None),
            Arc::new(elsewhere),
        ];
        assert_eq!(
            names(jobs_of_quota(&jobs, &quota)),
            ["admitted-queued", "moved-up", "new"]
        );
    }
}
