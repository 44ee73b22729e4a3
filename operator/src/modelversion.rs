//! ModelVersion controller. Today: validates the spec, and pins the artifact accepted first so a later edit
//! of it is refused (the controller-side mirror of the CEL immutability rule); gates, aliases and the in-use
//! finalizer come with the rollout work.

use std::sync::Arc;

use flywheel_crds::ModelVersion;
use flywheel_crds::common::ConditionStatus;
use flywheel_crds::modelversion::{AcceptedArtifact, ModelVersionStatus};
use jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use crate::controller::{Context, Error, apply_plan, run_controller};
use crate::plan::{Plan, spec_conditions};

pub const KIND: &str = "ModelVersion";

pub struct Observed<'a> {
    pub version: &'a ModelVersion,
    pub now: Timestamp,
}

pub fn plan(observed: &Observed<'_>) -> Plan<ModelVersionStatus> {
    let version = observed.version;
    let generation = version.metadata.generation;
    let mut status = version.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let validation = version.spec.validate(status.accepted_artifact.as_ref());
    if validation.is_ok() && status.accepted_artifact.is_none() {
        status.accepted_artifact = Some(AcceptedArtifact {
            uri: version.spec.artifact.uri.clone(),
            sha256: version.spec.artifact.sha256.clone(),
        });
    }
    let events = spec_conditions(
        &mut status.conditions,
        &validation,
        generation,
        observed.now,
        (ConditionStatus::True, "SpecAccepted", "the spec is valid"),
    );
    Plan {
        status,
        events,
        requeue: None,
    }
}

pub async fn reconcile(version: Arc<ModelVersion>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    let plan = plan(&Observed {
        version: &version,
        now: Timestamp::now(),
    });
    let api = Api::namespaced(ctx.client.clone(), &version.namespace().unwrap_or_default());
    apply_plan(
        &ctx,
        &api,
        version.as_ref(),
        KIND,
        version.status.as_ref(),
        plan,
    )
    .await
}

pub async fn run(ctx: Arc<Context>, stop: impl Future<Output = ()> + Send + Sync + 'static) {
    run_controller::<ModelVersion, _, _>(KIND, ctx, stop, reconcile).await;
}
