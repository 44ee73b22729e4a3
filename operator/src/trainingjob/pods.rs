//! How the plan reads a gang member's pod: its attempt and member, whether it still runs, and why it ended.

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

use super::gang::{self, LABEL_ATTEMPT, LABEL_INDEX, LABEL_ROLE, Member, Role};

pub(super) fn attempt_of(pod: &Pod) -> Option<u32> {
    pod.labels().get(LABEL_ATTEMPT)?.parse().ok()
}

pub(super) fn member_of(pod: &Pod) -> Option<Member> {
    let labels = pod.labels();
    Some(Member {
        role: Role::parse(labels.get(LABEL_ROLE)?)?,
        index: labels.get(LABEL_INDEX)?.parse().ok()?,
    })
}

pub(super) fn pod_phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

pub(super) fn is_live(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none() && !matches!(pod_phase(pod), "Succeeded" | "Failed")
}

/// The trainer's termination message, or failing that a description of how the container ended.
pub(super) fn termination(pod: &Pod) -> (Option<i32>, String) {
    let terminated = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|statuses| statuses.iter().find(|c| c.name == gang::CONTAINER))
        .and_then(|c| c.state.as_ref())
        .and_then(|state| state.terminated.as_ref());
    match terminated {
        Some(t) => (
            Some(t.exit_code),
            t.message
                .clone()
                .filter(|m| !m.trim().is_empty())
                .or_else(|| t.reason.clone())
                .unwrap_or_default(),
        ),
        None => (
            None,
            pod.status
                .as_ref()
                .and_then(|s| s.message.clone().or_else(|| s.reason.clone()))
                .unwrap_or_default(),
        ),
    }
}

pub(super) fn failure_reason(pod: &Pod) -> String {
    let (code, message) = termination(pod);
    let last = message
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or("no message")
        .trim();
    match code {
        Some(code) => format!("{} exited {code}: {last}", pod.name_any()),
        None => format!("{} failed: {last}", pod.name_any()),
    }
}
