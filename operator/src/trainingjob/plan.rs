//! The TrainingJob phase machine as a pure function: from the job, its pods, its quota's admission decision
//! and the chief's progress to the status, the pods to create or delete, and the ModelVersion to register.
//!
//! Queued → (admitted) Running → Succeeded | (a member failed) Restarting → Running … → Failed once
//! `backoffLimit` restarts are spent. Preemption and suspension take the gang down without counting a restart;
//! every new gang is a new `attempt`, and pods of an older attempt are gone before the next attempt's start.

use std::time::Duration;

use flywheel_crds::ModelVersion;
use flywheel_crds::common::{ConditionStatus, find_condition};
use flywheel_crds::trainingjob::{QueueStatus, TrainingJobStatus, TrainingPhase};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::builder::Builder;
pub use super::builder::{CONDITION_ADMITTED, CONDITION_COMPLETE, CONDITION_FAILED};
pub use super::chief::{
    ChiefConvergence, ChiefFeatureView, ChiefMetrics, ChiefResult, chief_result,
};
use super::dataset::{self, CONDITION_DATASET_BUILT, DatasetStep};
use super::gang::{self, CHIEF, GangContext, KUEUE_QUEUE_LABEL, Role};
pub use super::observed::{Observed, WarmStart};
pub use super::pod_health::{CONDITION_PODS_SCHEDULED, CONDITION_PODS_STARTED};
use super::pod_health::{Starting, containers_starting, scheduling};
use super::pods::{attempt_of, failure_reason, member_of, pod_phase, termination};
use super::registration::succeed;
pub use super::registration::{ANNOTATION_JOB_UID, LABEL_MODEL};
use crate::gpuquota::{Standing, standing};
use crate::plan::{Children, Plan, spec_conditions};

/// Restart reasons kept in status (the newest).
const MAX_RESTART_REASONS: usize = 10;
/// How often a running job's progress is polled.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(10);
/// How soon to look again while pods of an older attempt terminate.
const TERMINATION_POLL: Duration = Duration::from_secs(2);
/// How often a job looks again for the FeatureView it names.
const MISSING_INPUT_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq)]
pub struct TrainingPlan {
    pub plan: Plan<TrainingJobStatus>,
    /// Applied (create or update) whenever pods are created.
    pub service: Option<Service>,
    /// Applied with the Service: only the gang's own members reach its RPC port.
    pub network_policy: Option<NetworkPolicy>,
    pub create_pods: Vec<Pod>,
    pub delete_pods: Vec<String>,
    pub model_version: Option<ModelVersion>,
    /// The training-set Job to create.
    pub dataset_job: Option<Job>,
    /// How long the job waited for admission, on the reconcile that admitted it.
    pub admitted_after: Option<Duration>,
    /// A gang restart after a failure was decided.
    pub restarted: bool,
}

fn phase_of(status: &TrainingJobStatus) -> Option<TrainingPhase> {
    status.phase
}

/// Whether the job may run now, and if not why.
enum Admission {
    Admitted,
    Waiting {
        reason: String,
        position: Option<u32>,
        rejected: bool,
    },
}

fn admission(observed: &Observed<'_>) -> Admission {
    let job = observed.job;
    // A `kueue.x-k8s.io/queue-name` label does not exempt a job from its GPUQuota: any user can add the label,
    // and Kueue's admission (clearing spec.suspend) only adds a condition to Flywheel's.
    let Some(queue) = &job.spec.queue else {
        return Admission::Admitted;
    };
    let Some(quota) = observed.quota else {
        return Admission::Waiting {
            reason: format!("GPUQuota `{queue}` does not exist"),
            position: None,
            rejected: false,
        };
    };
    match standing(
        quota.status.as_ref(),
        &job.namespace().unwrap_or_default(),
        &job.name_any(),
        &job.uid().unwrap_or_default(),
    ) {
        Standing::Admitted => Admission::Admitted,
        Standing::Queued { reason, position } => Admission::Waiting {
            reason,
            position: Some(position),
            rejected: false,
        },
        Standing::Rejected { reason } => Admission::Waiting {
            reason,
            position: None,
            rejected: true,
        },
        Standing::Undecided => Admission::Waiting {
            reason: format!("waiting for GPUQuota `{queue}` to decide"),
            position: None,
            rejected: false,
        },
    }
}

pub fn plan(observed: &Observed<'_>) -> TrainingPlan {
    let job = observed.job;
    let mut status = job.status.clone().unwrap_or_default();
    status.observed_generation = job.metadata.generation;
    status.topology = Some(job.spec.topology.summary());
    let validation = job.spec.validate();
    let mut builder = Builder {
        observed,
        status,
        events: Vec::new(),
        delete_pods: Vec::new(),
        create_pods: Vec::new(),
        service: None,
        network_policy: None,
        model_version: None,
        dataset_job: None,
        admitted_after: None,
        restarted: false,
        requeue: None,
    };
    if validation.is_ok() {
        advance(&mut builder);
    }
    let ready = readiness(&builder.status);
    let mut events = spec_conditions(
        &mut builder.status.conditions,
        &validation,
        job.metadata.generation,
        observed.now,
        (ready.0, ready.1, &ready.2),
    );
    events.append(&mut builder.events);
    TrainingPlan {
        plan: Plan {
            status: builder.status,
            events,
            requeue: builder.requeue,
            children: Children::default(),
            finalizer: None,
        },
        service: builder.service,
        network_policy: builder.network_policy,
        create_pods: builder.create_pods,
        delete_pods: builder.delete_pods,
        model_version: builder.model_version,
        dataset_job: builder.dataset_job,
        admitted_after: builder.admitted_after,
        restarted: builder.restarted,
    }
}

/// `Ready` mirrors the phase: true once the job has produced its ModelVersion.
fn readiness(status: &TrainingJobStatus) -> (ConditionStatus, &'static str, String) {
    let failed_message = || {
        find_condition(&status.conditions, CONDITION_FAILED)
            .map(|c| c.message.clone())
            .unwrap_or_else(|| "the job failed".to_owned())
    };
    match status.phase {
        Some(TrainingPhase::Succeeded) => (
            ConditionStatus::True,
            "Succeeded",
            format!(
                "produced ModelVersion {}",
                status.model_version.as_deref().unwrap_or("(unknown)")
            ),
        ),
        Some(TrainingPhase::Failed) => (ConditionStatus::False, "Failed", failed_message()),
        Some(TrainingPhase::Queued) => (
            ConditionStatus::False,
            "Queued",
            status
                .queue
                .as_ref()
                .map(|q| q.reason.clone())
                .filter(|r| !r.is_empty())
                .unwrap_or_else(|| "waiting for admission".to_owned()),
        ),
        Some(TrainingPhase::Suspended) => (
            ConditionStatus::False,
            "Suspended",
            "spec.suspend is true".to_owned(),
        ),
        Some(TrainingPhase::Restarting) => (
            ConditionStatus::False,
            "Restarting",
            status
                .restart_reasons
                .last()
                .cloned()
                .unwrap_or_else(|| "restarting the gang".to_owned()),
        ),
        Some(TrainingPhase::Running) => (
            ConditionStatus::False,
            "Running",
            "training; Ready once the ModelVersion exists".to_owned(),
        ),
        None => (
            ConditionStatus::False,
            "Pending",
            "not started yet".to_owned(),
        ),
    }
}

fn advance(b: &mut Builder<'_, '_>) {
    let observed = b.observed;
    let job = observed.job;
    match phase_of(&b.status) {
        Some(TrainingPhase::Succeeded) => {
            // Parameter servers must never outlive the job (they hold memory and, on clusters, nodes).
            for pod in &observed.pods {
                if member_of(pod).is_some_and(|m| m.role == Role::Server)
                    && pod.metadata.deletion_timestamp.is_none()
                {
                    b.delete_pods.push(pod.name_any());
                }
            }
            return;
        }
        Some(TrainingPhase::Failed) => {
            b.take_down(true);
            return;
        }
        _ => {}
    }
    let paths = match gang::paths(&job.name_any(), &job.spec) {
        Ok(paths) => paths,
        Err(message) => {
            b.fail("UnsupportedData", message);
            return;
        }
    };
    if job.spec.suspend {
        if b.take_down(false) {
            b.event(
                false,
                "Suspended",
                "Suspend",
                "spec.suspend is true: the gang was removed; it resumes from its checkpoint".into(),
            );
        }
        b.enter(TrainingPhase::Suspended);
        b.status.queue = None;
        b.set(
            CONDITION_ADMITTED,
            ConditionStatus::False,
            "Suspended",
            "spec.suspend is true".into(),
        );
        return;
    }
    if job.spec.data.dataset.is_none() && !training_set_built(b, &paths) {
        return;
    }
    match admission(observed) {
        Admission::Waiting {
            reason,
            position,
            rejected,
        } => {
            if b.take_down(false) {
                b.event(
                    true,
                    "Evicted",
                    "Admit",
                    format!("the gang lost its admission and was removed: {reason}"),
                );
            }
            let since = b
                .status
                .queue
                .as_ref()
                .and_then(|q| q.since.clone())
                .or(Some(Time(observed.now)));
            b.enter(TrainingPhase::Queued);
            b.status.queue = Some(QueueStatus {
                reason: reason.clone(),
                position,
                since,
            });
            b.set(
                CONDITION_ADMITTED,
                ConditionStatus::False,
                if rejected { "NotAdmissible" } else { "Queued" },
                reason,
            );
            return;
        }
        Admission::Admitted => {}
    }
    let warm_start = match &observed.warm_start {
        WarmStart::NotRequested => None,
        WarmStart::Found { uri, sha256 } => Some((uri.as_str(), sha256.as_str())),
        WarmStart::Missing(name) => {
            b.enter(TrainingPhase::Queued);
            b.status.queue = Some(QueueStatus {
                reason: format!("waiting for ModelVersion `{name}` (spec.warmStartFrom)"),
                position: None,
                since: b
                    .status
                    .queue
                    .as_ref()
                    .and_then(|q| q.since.clone())
                    .or(Some(Time(observed.now))),
            });
            return;
        }
    };
    if matches!(phase_of(&b.status), None | Some(TrainingPhase::Queued)) {
        let waited_since = b
            .status
            .queue
            .as_ref()
            .and_then(|q| q.since.as_ref())
            .map(|t| t.0)
            .or_else(|| job.metadata.creation_timestamp.as_ref().map(|t| t.0))
            .unwrap_or(observed.now);
        b.admitted_after = observed.now.duration_since(waited_since).try_into().ok();
        b.event(
            false,
            "Admitted",
            "Admit",
            match &job.spec.queue {
                Some(queue) => format!("admitted by GPUQuota {queue}"),
                None => "admitted".to_owned(),
            },
        );
    }
    b.status.queue = None;
    b.set(
        CONDITION_ADMITTED,
        ConditionStatus::True,
        "Admitted",
        match &job.spec.queue {
            Some(queue) if job.labels().contains_key(KUEUE_QUEUE_LABEL) => {
                format!("admitted by GPUQuota {queue} (a Kueue queue label does not bypass it)")
            }
            Some(queue) => format!("admitted by GPUQuota {queue}"),
            None => "no GPUs requested: no quota needed".to_owned(),
        },
    );
    run_gang(b, &paths, warm_start);
}

/// The training-set step of a job on a FeatureView or on served traffic ([`dataset`]); true once its sets are
/// built.
fn training_set_built(b: &mut Builder<'_, '_>, paths: &gang::Paths) -> bool {
    let observed = b.observed;
    let step = match dataset::step(observed.job, paths, observed.settings, &observed.dataset) {
        Ok(step) => step,
        Err(err) => {
            b.fail(
                "DatasetBuildFailed",
                format!("the training-set Job cannot be written: {err}"),
            );
            return false;
        }
    };
    let source = dataset::source(observed.job);
    let building = format!(
        "Job {} builds the training and evaluation sets from {source}",
        dataset::job_name(&observed.job.name_any()),
    );
    let (reason, message) = match step {
        DatasetStep::Built { summary } => {
            if let Some(summary) = summary {
                let message = format!("from {source}: {summary}");
                b.event(false, "DatasetBuilt", "BuildDataset", message.clone());
                b.set(
                    CONDITION_DATASET_BUILT,
                    ConditionStatus::True,
                    "Built",
                    message,
                );
            }
            return true;
        }
        DatasetStep::Failed(message) => {
            b.set(
                CONDITION_DATASET_BUILT,
                ConditionStatus::False,
                "Failed",
                message.clone(),
            );
            b.fail("DatasetBuildFailed", message);
            return false;
        }
        DatasetStep::Start(job) => {
            b.event(false, "BuildingDataset", "BuildDataset", building.clone());
            b.dataset_job = Some(*job);
            ("Building".to_owned(), building)
        }
        DatasetStep::Building => ("Building".to_owned(), building),
        DatasetStep::Waiting { reason, message } => {
            b.requeue = Some(MISSING_INPUT_RETRY);
            (reason, message)
        }
    };
    b.set(
        CONDITION_DATASET_BUILT,
        ConditionStatus::False,
        &reason,
        message.clone(),
    );
    // No GPU is held while the data is built: the job waits before admission.
    b.enter(TrainingPhase::Queued);
    b.status.queue = Some(QueueStatus {
        reason: message,
        position: None,
        since: b
            .status
            .queue
            .as_ref()
            .and_then(|q| q.since.clone())
            .or(Some(Time(observed.now))),
    });
    false
}

fn run_gang(b: &mut Builder<'_, '_>, paths: &gang::Paths, warm_start: Option<(&str, &str)>) {
    let observed = b.observed;
    let job = observed.job;
    let attempt = b.status.attempt;
    let older: Vec<&Pod> = observed
        .pods
        .iter()
        .copied()
        .filter(|pod| attempt_of(pod).is_none_or(|a| a < attempt))
        .collect();
    if !older.is_empty() {
        // The new gang reuses the members' DNS names: start it only once the old one is gone.
        for pod in &older {
            if pod.metadata.deletion_timestamp.is_none() {
                b.delete_pods.push(pod.name_any());
            }
        }
        if b.status.phase != Some(TrainingPhase::Restarting) {
            b.enter(TrainingPhase::Restarting);
        }
        b.requeue = Some(TERMINATION_POLL);
        return;
    }
    let current: Vec<&Pod> = observed
        .pods
        .iter()
        .copied()
        .filter(|pod| attempt_of(pod) == Some(attempt))
        .collect();
    b.replicas(&current);
    let members = gang::members(&job.spec.topology);
    let failed = current.iter().find(|pod| pod_phase(pod) == "Failed");
    let workers_done = members
        .iter()
        .filter(|m| m.role == Role::Worker)
        .all(|member| {
            current
                .iter()
                .any(|pod| member_of(pod) == Some(*member) && pod_phase(pod) == "Succeeded")
        });
    let outcome = if let Some(pod) = failed {
        Err(failure_reason(pod))
    } else if workers_done {
        let chief = current
            .iter()
            .find(|pod| member_of(pod) == Some(CHIEF))
            .map(|pod| termination(pod).1)
            .unwrap_or_default();
        match chief_result(&chief) {
            Ok(result) => Ok(Some(result)),
            Err(reason) => Err(reason),
        }
    } else {
        Ok(None)
    };
    match outcome {
        Err(reason) => restart_or_fail(b, reason),
        Ok(Some(result)) => succeed(b, &result, warm_start),
        Ok(None) => {
            let gang_context = GangContext {
                attempt,
                paths,
                settings: observed.settings,
                quota: job
                    .spec
                    .queue
                    .as_deref()
                    .zip(observed.quota)
                    .map(|(name, quota)| (name, &quota.spec.isolation)),
                warm_start,
            };
            for member in &members {
                if !current.iter().any(|pod| member_of(pod) == Some(*member)) {
                    b.create_pods.push(gang::pod(job, *member, &gang_context));
                }
            }
            if !b.create_pods.is_empty() {
                b.service = Some(gang::service(job));
                b.network_policy = Some(gang::network_policy(job));
            }
            if b.status.start_time.is_none() {
                b.status.start_time = Some(Time(observed.now));
            }
            if b.status.phase != Some(TrainingPhase::Running) {
                b.event(
                    false,
                    "Started",
                    "Train",
                    format!("attempt {attempt}: {} pods", members.len()),
                );
            }
            b.enter(TrainingPhase::Running);
            scheduling(b, &current);
            if containers_starting(b, &current) == Starting::GaveUp {
                b.create_pods.clear();
                b.service = None;
                b.network_policy = None;
                return;
            }
            if let Some(progress) = &observed.progress {
                b.status.progress = Some(progress.clone());
            }
            b.requeue = Some(PROGRESS_INTERVAL);
        }
    }
}

fn restart_or_fail(b: &mut Builder<'_, '_>, reason: String) {
    let limit = b.observed.job.spec.backoff_limit;
    if b.status.restarts >= limit {
        b.fail(
            "BackoffLimitExceeded",
            format!("backoffLimit ({limit}) reached: {reason}"),
        );
        return;
    }
    b.take_down(false);
    b.status.restarts += 1;
    b.status.restart_reasons.push(reason.clone());
    let excess = b
        .status
        .restart_reasons
        .len()
        .saturating_sub(MAX_RESTART_REASONS);
    b.status.restart_reasons.drain(..excess);
    b.restarted = true;
    b.enter(TrainingPhase::Restarting);
    b.requeue = Some(TERMINATION_POLL);
    b.event(
        true,
        "GangRestart",
        "Train",
        format!(
            "restart {} of {limit} from the last checkpoint: {reason}",
            b.status.restarts
        ),
    );
}
