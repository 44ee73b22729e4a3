//! Whether an admitted gang's pods get going: scheduled (`PodsScheduled`) and their containers started
//! (`PodsStarted`), each naming the pod and the reason when not.

use std::time::Duration;

use flywheel_crds::common::{ConditionStatus, find_condition};
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::builder::Builder;

/// `PodsScheduled`: an admitted gang whose pods the scheduler cannot place (no node has the GPUs asked for,
/// a taint, …) says so instead of looking like it trains; the Warning is raised once per episode.
pub(super) fn scheduling(b: &mut Builder<'_, '_>, current: &[&Pod]) {
    let unschedulable: Vec<(String, String)> = current
        .iter()
        .filter_map(|pod| {
            let scheduled = pod
                .status
                .as_ref()?
                .conditions
                .as_ref()?
                .iter()
                .find(|c| c.type_ == "PodScheduled")?;
            (scheduled.status == "False" && scheduled.reason.as_deref() == Some("Unschedulable"))
                .then(|| {
                    (
                        pod.name_any(),
                        scheduled.message.clone().unwrap_or_default(),
                    )
                })
        })
        .collect();
    let was_unschedulable = find_condition(&b.status.conditions, CONDITION_PODS_SCHEDULED)
        .is_some_and(|c| c.status == ConditionStatus::False.as_str());
    match unschedulable.first() {
        Some((pod, message)) => {
            let text = format!(
                "{} of {} pods cannot be scheduled; {pod}: {message}",
                unschedulable.len(),
                current.len()
            );
            if !was_unschedulable {
                b.event(true, "Unschedulable", "Schedule", text.clone());
            }
            b.set(
                CONDITION_PODS_SCHEDULED,
                ConditionStatus::False,
                "Unschedulable",
                text,
            );
        }
        None if !current.is_empty() => b.set(
            CONDITION_PODS_SCHEDULED,
            ConditionStatus::True,
            "Scheduled",
            "every pod of the gang is scheduled or waiting for the scheduler".to_owned(),
        ),
        None => {}
    }
}

pub const CONDITION_PODS_SCHEDULED: &str = "PodsScheduled";

/// Why a container that the kubelet cannot start waits: nothing will change without a fix (a wrong image, a
/// missing Secret), so the gang would look like it trains forever.
const STUCK_STARTING: [&str; 7] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

#[derive(Debug, PartialEq, Eq)]
pub(super) enum Starting {
    Fine,
    Stuck,
    /// Stuck past `spec.startTimeout`: the job failed and its pods go.
    GaveUp,
}

/// `PodsStarted`: a scheduled gang whose containers the kubelet cannot start (image pull, container config)
/// names the pod, the container and the kubelet's reason; the Warning is raised once per episode. Stuck for
/// longer than `spec.startTimeout`, the job fails with that reason, so its quota goes back to the queue.
pub(super) fn containers_starting(b: &mut Builder<'_, '_>, current: &[&Pod]) -> Starting {
    let stuck: Vec<(String, String, &'static str, String)> = current
        .iter()
        .flat_map(|pod| {
            let statuses = pod
                .status
                .as_ref()
                .and_then(|status| status.container_statuses.as_ref());
            statuses.into_iter().flatten().filter_map(|container| {
                let waiting = container.state.as_ref()?.waiting.as_ref()?;
                let reason = waiting.reason.as_deref()?;
                let reason = STUCK_STARTING.into_iter().find(|stuck| *stuck == reason)?;
                Some((
                    pod.name_any(),
                    container.name.clone(),
                    reason,
                    waiting.message.clone().unwrap_or_default(),
                ))
            })
        })
        .collect();
    let stuck_since = find_condition(&b.status.conditions, CONDITION_PODS_STARTED)
        .filter(|c| c.status == ConditionStatus::False.as_str())
        .map(|c| c.last_transition_time.0);
    match stuck.first() {
        Some((pod, container, reason, message)) => {
            let text = format!(
                "{} of {} pods cannot start; {pod} (container {container}): {reason}: {message}",
                stuck.len(),
                current.len()
            );
            let timeout = b.observed.job.spec.start_timeout();
            let stuck_for = stuck_since
                .map(|since| b.observed.now.duration_since(since))
                .and_then(|elapsed| Duration::try_from(elapsed).ok());
            let limit = timeout.parse().unwrap_or(Duration::from_secs(300));
            if stuck_for.is_some_and(|stuck_for| stuck_for >= limit) {
                b.fail(
                    reason,
                    format!("{text}; gave up after spec.startTimeout ({timeout})"),
                );
                return Starting::GaveUp;
            }
            if stuck_since.is_none() {
                b.event(true, reason, "Start", text.clone());
            }
            b.set(CONDITION_PODS_STARTED, ConditionStatus::False, reason, text);
            Starting::Stuck
        }
        None if stuck_since.is_some() => {
            b.set(
                CONDITION_PODS_STARTED,
                ConditionStatus::True,
                "Started",
                "no container of the gang is stuck starting".to_owned(),
            );
            Starting::Fine
        }
        None => Starting::Fine,
    }
}

pub const CONDITION_PODS_STARTED: &str = "PodsStarted";
