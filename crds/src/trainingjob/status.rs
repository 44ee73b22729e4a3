//! A TrainingJob's observed state, written by the operator.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::modelversion::OfflineMetrics;
use crate::tuning::TuningStatus;

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TrainingPhase {
    Queued,
    Running,
    Restarting,
    Suspended,
    Succeeded,
    Failed,
}

/// Observed state of a TrainingJob, written by the operator: phase, queue position, pods, progress, metrics
/// and restarts.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingJobStatus {
    /// The `metadata.generation` the operator last reconciled; while it is behind, the status does not reflect
    /// the latest spec yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard Kubernetes conditions. Types: `Ready`; `InvalidSpec` (True when the spec breaks a rule, the
    /// message naming each field); `DatasetBuilt` (the training set was built from the FeatureView);
    /// `Admitted` (admitted, or why it waits); `PodsScheduled` and `PodsStarted` (False, with the reason, while
    /// the gang's pods cannot be scheduled or their containers cannot start); `Complete` (True once the
    /// ModelVersion was created); `Failed` (True, with the reason, when the job failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// `Queued` (waiting for admission, its training set or its warm-start version), `Running`, `Restarting`
    /// (the gang restarts from its last checkpoint after a failure), `Suspended` (`spec.suspend`), `Succeeded`
    /// or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<TrainingPhase>,
    /// Topology summary (printer column), e.g. `ps 2x4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<String>,
    /// While `Queued`: why, and the place in the queue (1 = next).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueStatus>,
    /// Pods of the current attempt, per role (`worker`, `server`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaStatus>,
    /// Training progress as the chief worker last reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<TrainingProgress>,
    /// Offline metrics on the evaluation set, once training succeeded; copied to the ModelVersion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<OfflineMetrics>,
    /// How training ended: epochs trained, the epoch whose weights were kept, and whether it stopped early.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convergence: Option<ConvergenceStatus>,
    /// The search's trials and the one registered, when `spec.tuning` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tuning: Option<TuningStatus>,
    /// Gang restarts after a failure so far (counted against `backoffLimit`), and why.
    #[serde(default)]
    pub restarts: u32,
    /// Generation of the gang's pods: every restart, preemption or resume after suspension starts a new one,
    /// and pods of an older attempt are removed before the new attempt's pods are made.
    #[serde(default)]
    pub attempt: u32,
    /// Why the gang was restarted, oldest first (the last 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restart_reasons: Vec<String>,
    /// When the gang's pods were first created (the first attempt's start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job succeeded or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The ModelVersion this job produced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConvergenceStatus {
    /// Epochs trained (at most `spec.epochs`).
    #[schemars(range(min = 0, max = 1000))]
    pub epochs_trained: u32,
    /// The epoch (counting from 1) whose weights the model keeps: the lowest held-out log loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub best_epoch: Option<u32>,
    /// Whether early stopping ended training before `spec.epochs`.
    #[serde(default)]
    pub stopped_early: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueStatus {
    /// Why the job waits, e.g. no room in its GPUQuota, preempted, its training set being built, or its
    /// warm-start ModelVersion missing.
    pub reason: String,
    /// Place in the GPUQuota's queue (1 = admitted next); absent when the job does not wait for the quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u32>,
    /// When the job started waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// `worker` or `server`.
    pub role: String,
    /// Pods the topology asks for in this role.
    pub desired: u32,
    /// Pods of this role that exist and have not finished (pending or running).
    #[serde(default)]
    pub active: u32,
    /// Pods of this role that exited successfully.
    #[serde(default)]
    pub succeeded: u32,
    /// Pods of this role that failed.
    #[serde(default)]
    pub failed: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingProgress {
    /// Training steps (mini-batches) done so far.
    pub step: u64,
    /// Steps planned for all of `spec.epochs`; early stopping may end training sooner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<u64>,
    /// Current epoch, counting from 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u32>,
    /// Completed share as text (printer column), e.g. `42%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<String>,
    /// Training throughput in rows per second since the chief's previous report: the whole gang's in a
    /// data-parallel job, the chief worker's own in a parameter-server job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples_per_second: Option<f64>,
    /// Training loss (log loss) of the latest reported mini-batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
}
