//! The TrainingJob plan's working state: the status being built, the Events, the pods to create and delete and
//! the objects to apply, with the moves every step shares (conditions, phases, taking the gang down).

use std::collections::BTreeMap;
use std::time::Duration;

use flywheel_crds::ModelVersion;
use flywheel_crds::common::{ConditionStatus, condition, set_condition};
use flywheel_crds::trainingjob::{ReplicaStatus, TrainingJobStatus, TrainingPhase};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::gang::{self, Role};
use super::observed::Observed;
use super::pods::{attempt_of, is_live, member_of, pod_phase};
use crate::plan::PlannedEvent;

pub const CONDITION_ADMITTED: &str = "Admitted";
pub const CONDITION_COMPLETE: &str = "Complete";
pub const CONDITION_FAILED: &str = "Failed";

pub(super) struct Builder<'o, 'a> {
    pub(super) observed: &'o Observed<'a>,
    pub(super) status: TrainingJobStatus,
    pub(super) events: Vec<PlannedEvent>,
    pub(super) delete_pods: Vec<String>,
    pub(super) create_pods: Vec<Pod>,
    pub(super) service: Option<Service>,
    pub(super) network_policy: Option<NetworkPolicy>,
    pub(super) model_version: Option<ModelVersion>,
    pub(super) dataset_job: Option<Job>,
    pub(super) admitted_after: Option<Duration>,
    pub(super) restarted: bool,
    pub(super) requeue: Option<Duration>,
}

impl Builder<'_, '_> {
    pub(super) fn event(
        &mut self,
        warning: bool,
        reason: &'static str,
        action: &'static str,
        note: String,
    ) {
        self.events.push(PlannedEvent {
            warning,
            reason,
            action,
            note,
        });
    }

    pub(super) fn set(
        &mut self,
        type_: &str,
        status: ConditionStatus,
        reason: &str,
        message: String,
    ) {
        set_condition(
            &mut self.status.conditions,
            condition(
                type_,
                status,
                reason,
                message,
                self.observed.job.metadata.generation,
                self.observed.now,
            ),
        );
    }

    pub(super) fn enter(&mut self, phase: TrainingPhase) {
        self.status.phase = Some(phase);
    }

    /// Deletes the gang's pods (finished ones too unless `keep_finished`, which keeps a failed job's pods for
    /// inspection). Taking down pods of the current attempt starts a new attempt, so the next gang is new.
    pub(super) fn take_down(&mut self, keep_finished: bool) -> bool {
        let current = self.status.attempt;
        let mut had_current = false;
        for pod in &self.observed.pods {
            if pod.metadata.deletion_timestamp.is_some() || (keep_finished && !is_live(pod)) {
                continue;
            }
            had_current |= attempt_of(pod) == Some(current);
            self.delete_pods.push(pod.name_any());
        }
        if had_current && !keep_finished {
            self.status.attempt += 1;
        }
        had_current
    }

    pub(super) fn finish(&mut self, phase: TrainingPhase) {
        self.enter(phase);
        if self.status.completion_time.is_none() {
            self.status.completion_time = Some(Time(self.observed.now));
        }
        self.status.queue = None;
    }

    pub(super) fn fail(&mut self, reason: &str, message: String) {
        self.take_down(true);
        self.finish(TrainingPhase::Failed);
        self.set(
            CONDITION_FAILED,
            ConditionStatus::True,
            reason,
            message.clone(),
        );
        self.event(true, "Failed", "Train", message);
    }

    pub(super) fn replicas(&mut self, current: &[&Pod]) {
        let topology = &self.observed.job.spec.topology;
        let members = gang::members(topology);
        let mut replicas: BTreeMap<Role, ReplicaStatus> = BTreeMap::new();
        for member in &members {
            replicas
                .entry(member.role)
                .or_insert_with(|| ReplicaStatus {
                    role: member.role.as_str().to_owned(),
                    desired: 0,
                    active: 0,
                    succeeded: 0,
                    failed: 0,
                })
                .desired += 1;
        }
        for pod in current {
            let Some(member) = member_of(pod) else {
                continue;
            };
            if let Some(replica) = replicas.get_mut(&member.role) {
                match pod_phase(pod) {
                    "Succeeded" => replica.succeeded += 1,
                    "Failed" => replica.failed += 1,
                    _ if pod.metadata.deletion_timestamp.is_none() => replica.active += 1,
                    _ => {}
                }
            }
        }
        self.status.replicas = replicas.into_values().collect();
    }
}
