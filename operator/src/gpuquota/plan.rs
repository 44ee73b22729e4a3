//! The GPUQuota's plan, pure: admission of the jobs that name it (see `admission`) into its status, and where
//! one job stands in that decision (what the TrainingJob controller reads).

use flywheel_crds::GPUQuota;
use flywheel_crds::TrainingJob;
use flywheel_crds::common::ConditionStatus;
use flywheel_crds::gpuquota::{GPUQuotaStatus, GpuLimit, JobRef};
use flywheel_crds::trainingjob::TrainingPhase;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Namespace;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};
use kube::runtime::reflector::{ObjectRef, Store};

use super::admission::{Candidate, Decision, decide};
use crate::plan::{Children, Plan, PlannedEvent, spec_conditions};

pub struct Observed<'a> {
    pub quota: &'a GPUQuota,
    pub candidates: Vec<Candidate>,
    pub now: Timestamp,
}

pub fn plan(observed: &Observed<'_>) -> Plan<GPUQuotaStatus> {
    let quota = observed.quota;
    let generation = quota.metadata.generation;
    let mut status = quota.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let validation = quota.spec.validate();
    let mut events = spec_conditions(
        &mut status.conditions,
        &validation,
        generation,
        observed.now,
        (ConditionStatus::True, "SpecAccepted", "the spec is valid"),
    );
    if validation.is_err() {
        // An invalid quota admits nothing new; jobs it admitted keep running.
        return Plan {
            status,
            events,
            requeue: None,
            children: Children::default(),
            finalizer: None,
        };
    }
    let decision = decide(
        &quota.name_any(),
        &quota.spec,
        &status.admitted,
        &status.queued,
        &observed.candidates,
    );
    for (victim, by) in &decision.preempted {
        events.push(PlannedEvent {
            warning: false,
            reason: "Preempted",
            action: "Admit",
            note: format!(
                "{}/{} gives its GPUs to higher-priority {}/{}",
                victim.namespace, victim.name, by.namespace, by.name
            ),
        });
    }
    apply_decision(&mut status, &quota.spec.limits, decision);
    Plan {
        status,
        events,
        requeue: None,
        children: Children::default(),
        finalizer: None,
    }
}

fn apply_decision(status: &mut GPUQuotaStatus, limits: &[GpuLimit], decision: Decision) {
    status.used = decision
        .used
        .iter()
        .map(|(resource, count)| GpuLimit {
            resource: resource.clone(),
            count: u32::try_from(*count).unwrap_or(u32::MAX),
        })
        .collect();
    status.used_summary = Some(
        limits
            .iter()
            .map(|limit| {
                format!(
                    "{} {}/{}",
                    limit.resource,
                    decision
                        .used
                        .get(&limit.resource)
                        .copied()
                        .unwrap_or_default(),
                    limit.count
                )
            })
            .collect::<Vec<_>>()
            .join(", "),
    );
    status.admitted_count = u32::try_from(decision.admitted.len()).unwrap_or(u32::MAX);
    status.queued_count = u32::try_from(decision.queued.len()).unwrap_or(u32::MAX);
    status.admitted = decision.admitted;
    status.queued = decision.queued;
    status.rejected = decision.rejected;
}

/// Whether the job still competes for the quota: not finished and not suspended. A Kueue queue label changes
/// nothing here: the quota holds every job that names it.
fn competes(job: &TrainingJob) -> bool {
    let finished = matches!(
        job.status.as_ref().and_then(|s| s.phase),
        Some(TrainingPhase::Succeeded | TrainingPhase::Failed)
    );
    !finished
        && !job.spec.suspend
        && job.metadata.deletion_timestamp.is_none()
        && job.spec.validate().is_ok()
}

/// Whether the quota covers `namespace`: listed by name, or matched by the selector.
pub fn covers(quota: &GPUQuota, namespace: &str, namespaces: &Store<Namespace>) -> bool {
    if quota.spec.namespaces.names.iter().any(|n| n == namespace) {
        return true;
    }
    let Some(selector) = &quota.spec.namespaces.selector else {
        return false;
    };
    let Ok(selector) = Selector::try_from(selector.clone()) else {
        return false;
    };
    namespaces
        .get(&ObjectRef::new(namespace))
        .is_some_and(|ns| selector.matches(ns.labels()))
}

/// The jobs that name `quota` and still compete for it.
pub fn candidates(
    quota: &GPUQuota,
    jobs: &Store<TrainingJob>,
    namespaces: &Store<Namespace>,
) -> Vec<Candidate> {
    let name = quota.name_any();
    jobs.state()
        .iter()
        .filter(|job| job.spec.queue.as_deref() == Some(name.as_str()) && competes(job))
        .map(|job| {
            let namespace = job.namespace().unwrap_or_default();
            Candidate {
                namespace_covered: covers(quota, &namespace, namespaces),
                namespace,
                name: job.name_any(),
                uid: job.uid().unwrap_or_default(),
                priority: job.spec.priority,
                created: job
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map_or(Timestamp::UNIX_EPOCH, |t| t.0),
                demand: job
                    .spec
                    .topology
                    .gpu_demand()
                    .map(|(resource, count)| (resource.to_owned(), count)),
            }
        })
        .collect()
}

/// Where a job stands in its quota's decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Standing {
    Admitted,
    /// Waiting; `position` 1 is admitted next.
    Queued {
        reason: String,
        position: u32,
    },
    Rejected {
        reason: String,
    },
    /// The quota has not decided on this job yet.
    Undecided,
}

/// Looks the job up in the quota's last decision.
pub fn standing(
    status: Option<&GPUQuotaStatus>,
    namespace: &str,
    name: &str,
    uid: &str,
) -> Standing {
    let Some(status) = status else {
        return Standing::Undecided;
    };
    let is = |job: &JobRef| {
        job.namespace == namespace
            && job.name == name
            && job.uid.as_deref().is_none_or(|u| u == uid)
    };
    if status.admitted.iter().any(is) {
        return Standing::Admitted;
    }
    if let Some(index) = status.queued.iter().position(is) {
        return Standing::Queued {
            reason: status.queued[index].reason.clone().unwrap_or_default(),
            position: u32::try_from(index + 1).unwrap_or(u32::MAX),
        };
    }
    if let Some(job) = status.rejected.iter().find(|job| is(job)) {
        return Standing::Rejected {
            reason: job.reason.clone().unwrap_or_default(),
        };
    }
    Standing::Undecided
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::examples::{condition, load};

    #[test]
    fn example_quota_is_ready() {
        let quota: GPUQuota = load("gpuquota.yaml", 1);
        let plan = plan(&Observed {
            quota: &quota,
            candidates: Vec::new(),
            now: Timestamp::UNIX_EPOCH,
        });
        assert_eq!(
            condition(&plan.status.conditions, "Ready"),
            ("True", "the spec is valid", Some(1))
        );
        assert_eq!(
            plan.status.used_summary.as_deref(),
            Some("nvidia.com/gpu 0/8, nvidia.com/mig-1g.10gb 0/14")
        );
    }

    #[test]
    fn duplicate_and_unknown_resources_are_named() {
        let mut quota: GPUQuota = load("gpuquota.yaml", 1);
        quota.spec.limits[1].resource = "nvidia.com/gpu".into();
        quota.spec.limits.push(GpuLimit {
            resource: "intel.com/gpu".into(),
            count: 1,
        });
        let plan = plan(&Observed {
            quota: &quota,
            candidates: Vec::new(),
            now: Timestamp::UNIX_EPOCH,
        });
        let (_, message, _) = condition(&plan.status.conditions, "InvalidSpec");
        assert!(
            message.contains("spec.limits[1].resource: `nvidia.com/gpu` is listed twice"),
            "{message}"
        );
        assert!(
            message.contains("spec.limits[2].resource: unknown GPU resource `intel.com/gpu`"),
            "{message}"
        );
    }

    fn candidate(name: &str, priority: i32, gpus: u64) -> Candidate {
        Candidate {
            namespace: "default".into(),
            name: name.into(),
            uid: name.into(),
            priority,
            // Created in name order, so admission order is predictable.
            created: Timestamp::from_second(i64::from(name.as_bytes()[0]))
                .unwrap_or(Timestamp::UNIX_EPOCH),
            demand: Some(("nvidia.com/gpu".into(), gpus)),
            namespace_covered: true,
        }
    }

    #[test]
    fn decision_is_written_to_status_and_read_back_as_standing() {
        let quota: GPUQuota = load("gpuquota.yaml", 1);
        let plan = plan(&Observed {
            quota: &quota,
            candidates: vec![
                candidate("a", 0, 4),
                candidate("b", 0, 4),
                candidate("c", 0, 4),
            ],
            now: Timestamp::UNIX_EPOCH,
        });
        let status = &plan.status;
        assert_eq!((status.admitted_count, status.queued_count), (2, 1));
        assert_eq!(
            status.used_summary.as_deref(),
            Some("nvidia.com/gpu 8/8, nvidia.com/mig-1g.10gb 0/14")
        );
        assert_eq!(
            standing(Some(status), "default", "a", "a"),
            Standing::Admitted
        );
        assert_eq!(
            standing(Some(status), "default", "c", "c"),
            Standing::Queued {
                reason: "waiting for 4 nvidia.com/gpu: 8 of 8 in use".into(),
                position: 1
            }
        );
        assert_eq!(
            standing(Some(status), "default", "c", "other-uid"),
            Standing::Undecided
        );
    }

    #[test]
    fn preemption_is_announced() {
        let mut quota: GPUQuota = load("gpuquota.yaml", 1);
        quota.status = Some(GPUQuotaStatus {
            admitted: ["a", "b"]
                .iter()
                .map(|name| JobRef {
                    namespace: "default".into(),
                    name: (*name).into(),
                    uid: Some((*name).into()),
                    reason: None,
                })
                .collect(),
            ..GPUQuotaStatus::default()
        });
        let plan = plan(&Observed {
            quota: &quota,
            candidates: vec![
                candidate("a", 0, 4),
                candidate("b", 0, 4),
                candidate("vip", 9, 4),
            ],
            now: Timestamp::UNIX_EPOCH,
        });
        assert!(
            plan.events
                .iter()
                .any(|e| e.reason == "Preempted" && e.note.contains("default/b")),
            "{:?}",
            plan.events
        );
    }
}
