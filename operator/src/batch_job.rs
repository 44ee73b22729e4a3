//! How a batch Job the operator runs ended, read from its conditions and its pods' termination messages
//! (where Flywheel's batch commands leave their JSON report).

use jiff::Timestamp;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Running,
    Succeeded {
        finished: Timestamp,
        /// The newest termination message of its pods.
        message: Option<String>,
    },
    Failed {
        message: Option<String>,
    },
}

/// The outcome of `job`; `pods` may hold other pods too (those of the Job carry its `job-name` label).
pub fn outcome(job: &Job, pods: &[Pod]) -> Outcome {
    let name = job.name_any();
    let created = job
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(Timestamp::UNIX_EPOCH, |t| t.0);
    let status = job.status.clone().unwrap_or_default();
    let finished = |type_: &str| {
        status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == type_ && c.status == "True")
    };
    let newest_message = pods
        .iter()
        .filter(|pod| pod.labels().get("job-name") == Some(&name))
        .flat_map(|pod| {
            pod.status
                .iter()
                .flat_map(|s| s.container_statuses.iter().flatten())
        })
        .filter_map(|container| {
            let terminated = container.state.as_ref()?.terminated.as_ref()?;
            Some((
                terminated
                    .finished_at
                    .as_ref()
                    .map_or(Timestamp::UNIX_EPOCH, |t| t.0),
                terminated.message.clone().unwrap_or_default(),
            ))
        })
        .max_by_key(|(at, _)| *at)
        .map(|(_, message)| message);
    if finished("Complete") || status.succeeded.unwrap_or(0) > 0 {
        Outcome::Succeeded {
            finished: status.completion_time.map_or(created, |t| t.0),
            message: newest_message,
        }
    } else if finished("Failed") {
        // Stopped at its deadline, the Job's pods were killed mid-run: their last words are not the reason.
        let failed = status
            .conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == "Failed" && c.status == "True");
        let said = |c: &&k8s_openapi::api::batch::v1::JobCondition| {
            format!(
                "{}: {}",
                c.reason.as_deref().unwrap_or("Failed"),
                c.message.as_deref().unwrap_or_default()
            )
        };
        let deadline = failed
            .filter(|c| c.reason.as_deref() == Some("DeadlineExceeded"))
            .map(|c| said(&c));
        Outcome::Failed {
            message: deadline
                .or(newest_message.filter(|message| !message.is_empty()))
                .or(failed.map(|c| said(&c))),
        }
    } else {
        Outcome::Running
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_job_stopped_at_its_deadline_says_so_and_others_give_their_pods_words() {
        let job = |reason: &str, message: &str| -> Job {
            serde_json::from_value(json!({
                "metadata": {"name": "m-1"},
                "status": {"conditions": [{"type": "Failed", "status": "True", "reason": reason, "message": message}]},
            }))
            .unwrap_or_else(|e| panic!("{e}"))
        };
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "m-1-x", "labels": {"job-name": "m-1"}},
            "status": {"containerStatuses": [{
                "name": "materialize", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 1, "message": "/data/events: column `price` is missing"}},
            }]},
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let deadline = job(
            "DeadlineExceeded",
            "Job was active longer than specified deadline",
        );
        assert_eq!(
            outcome(&deadline, std::slice::from_ref(&pod)),
            Outcome::Failed {
                message: Some(
                    "DeadlineExceeded: Job was active longer than specified deadline".into()
                )
            }
        );
        let failed = job(
            "BackoffLimitExceeded",
            "Job has reached the specified backoff limit",
        );
        assert_eq!(
            outcome(&failed, std::slice::from_ref(&pod)),
            Outcome::Failed {
                message: Some("/data/events: column `price` is missing".into())
            }
        );
        assert_eq!(
            outcome(&failed, &[]),
            Outcome::Failed {
                message: Some(
                    "BackoffLimitExceeded: Job has reached the specified backoff limit".into()
                )
            }
        );
    }
}
