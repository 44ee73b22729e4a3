//! A served version's pods as the Rollout plan sees them: how many of the wanted replicas are available (the
//! Deployment's own count, once it has seen the current spec) and, for a reason to show, what each pod that is
//! not serving is doing. Pure: the caller reads the Deployment and the pods.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct VersionPods {
    pub desired: i32,
    pub available: i32,
    /// `<pod>: <state>` for each pod that is not ready.
    pub problems: Vec<String>,
}

impl VersionPods {
    /// Every wanted replica is available: the version can take (more) traffic.
    pub fn all_available(&self) -> bool {
        self.desired > 0 && self.available >= self.desired
    }

    pub fn describe(&self) -> String {
        let mut text = format!("{}/{} pods available", self.available, self.desired);
        for problem in &self.problems {
            text.push_str("; ");
            text.push_str(problem);
        }
        text
    }
}

/// A version's availability from its Deployment (`None`: not created yet) and its pods.
pub fn observe(deployment: Option<&Deployment>, pods: &[Pod]) -> VersionPods {
    let Some(deployment) = deployment else {
        return VersionPods::default();
    };
    let desired = deployment
        .spec
        .as_ref()
        .and_then(|spec| spec.replicas)
        .unwrap_or(1);
    let status = deployment.status.clone().unwrap_or_default();
    // A status older than the spec counts the previous template's pods.
    let current = status.observed_generation >= deployment.metadata.generation;
    let available = if current {
        status.available_replicas.unwrap_or(0)
    } else {
        0
    };
    let problems = pods
        .iter()
        .filter_map(|pod| pod_problem(pod).map(|state| format!("{}: {state}", pod.name_any())))
        .collect();
    VersionPods {
        desired,
        available,
        problems,
    }
}

/// The last line a container left in its termination message (its error, with `FallbackToLogsOnError`), cut
/// to a length a condition can carry.
fn last_words(message: &str) -> String {
    const MAX_CHARS: usize = 300;
    let line = message
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .unwrap_or_default()
        .trim();
    match line.char_indices().nth(MAX_CHARS) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_owned(),
    }
}

/// What keeps a pod from serving, or `None` when it is ready.
fn pod_problem(pod: &Pod) -> Option<String> {
    let status = pod.status.as_ref()?;
    let conditions = status.conditions.as_deref().unwrap_or_default();
    if conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True")
    {
        return None;
    }
    if let Some(unschedulable) = conditions
        .iter()
        .find(|c| c.type_ == "PodScheduled" && c.status == "False")
    {
        return Some(format!(
            "not scheduled ({})",
            unschedulable
                .message
                .as_deref()
                .unwrap_or("no reason given")
        ));
    }
    for container in status.container_statuses.iter().flatten() {
        let state = container.state.as_ref();
        if let Some(waiting) = state.and_then(|s| s.waiting.as_ref()) {
            let reason = waiting.reason.as_deref().unwrap_or("Waiting");
            let last_exit = container
                .last_state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .map(|t| match t.message.as_deref().map(last_words) {
                    Some(said) if !said.is_empty() => {
                        format!(", last exit code {}: {said}", t.exit_code)
                    }
                    _ => format!(", last exit code {}", t.exit_code),
                })
                .unwrap_or_default();
            return Some(match waiting.message.as_deref() {
                Some(message) => format!(
                    "{reason} after {} restarts{last_exit} ({message})",
                    container.restart_count
                ),
                None => format!(
                    "{reason} after {} restarts{last_exit}",
                    container.restart_count
                ),
            });
        }
        if let Some(terminated) = state.and_then(|s| s.terminated.as_ref()) {
            return Some(format!(
                "terminated with exit code {} ({})",
                terminated.exit_code,
                terminated.reason.as_deref().unwrap_or("no reason given")
            ));
        }
    }
    Some(format!(
        "{} and not ready",
        status.phase.as_deref().unwrap_or("Unknown")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(replicas: i32, available: i32, generation: i64, observed: i64) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "ctr-ctr-v2", "generation": generation},
            "spec": {"replicas": replicas, "selector": {}, "template": {}},
            "status": {"availableReplicas": available, "observedGeneration": observed},
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn pod(name: &str, status: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": name}, "status": status}))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn only_a_current_status_with_every_replica_available_counts() {
        assert!(observe(Some(&deployment(2, 2, 3, 3)), &[]).all_available());
        assert!(!observe(Some(&deployment(2, 1, 3, 3)), &[]).all_available());
        assert!(
            !observe(Some(&deployment(2, 2, 4, 3)), &[]).all_available(),
            "a status of the previous spec"
        );
        assert!(!observe(None, &[]).all_available());
        assert!(!observe(Some(&deployment(0, 0, 1, 1)), &[]).all_available());
    }

    #[test]
    fn a_crash_looping_or_unschedulable_pod_is_named_with_its_state() {
        let crashing = pod(
            "ctr-ctr-v2-7f9-abc",
            json!({
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [{
                    "name": "serve", "image": "i", "imageID": "", "ready": false, "restartCount": 4,
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s restarting failed container"}},
                    "lastState": {"terminated": {"exitCode": 1}},
                }],
            }),
        );
        let pending = pod(
            "ctr-ctr-v2-7f9-def",
            json!({
                "phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "False", "message": "0/1 nodes have enough memory"}],
            }),
        );
        let ready = pod(
            "ctr-ctr-v2-7f9-ghi",
            json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]}),
        );
        let seen = observe(Some(&deployment(3, 1, 1, 1)), &[crashing, pending, ready]);
        assert_eq!(
            seen.describe(),
            "1/3 pods available; ctr-ctr-v2-7f9-abc: CrashLoopBackOff after 4 restarts, last exit code 1 \
             (back-off 40s restarting failed container); ctr-ctr-v2-7f9-def: not scheduled (0/1 nodes have \
             enough memory)"
        );
    }

    #[test]
    fn a_crashed_containers_last_words_are_shown() {
        let failing = pod(
            "ctr-traffic-log-5d-xyz",
            json!({
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "False"}],
                "containerStatuses": [{
                    "name": "log-traffic", "image": "i", "imageID": "", "ready": false, "restartCount": 2,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"exitCode": 1, "message":
                        "starting\nflywheel-trainer: the brokers refused the credentials: SASL authentication error\n\n"}},
                }],
            }),
        );
        assert_eq!(
            observe(Some(&deployment(1, 0, 1, 1)), &[failing]).describe(),
            "0/1 pods available; ctr-traffic-log-5d-xyz: CrashLoopBackOff after 2 restarts, last exit code 1: \
             flywheel-trainer: the brokers refused the credentials: SASL authentication error"
        );
        assert_eq!(last_words(&"x".repeat(400)).chars().count(), 301);
    }
}
