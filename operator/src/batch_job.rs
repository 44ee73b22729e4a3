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
        Outcome::Failed {
            message: newest_message,
        }
    } else {
        Outcome::Running
    }
}
