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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::examples::{condition, load};

    #[test]
    fn first_valid_reconcile_pins_the_artifact() {
        let version: ModelVersion = load("modelversion.yaml", 1);
        let plan = plan(&Observed {
            version: &version,
            now: Timestamp::UNIX_EPOCH,
        });
        let accepted = plan.status.accepted_artifact.clone();
        assert_eq!(
            accepted.map(|a| a.sha256),
            Some(version.spec.artifact.sha256.clone())
        );
        assert_eq!(condition(&plan.status.conditions, "Ready").0, "True");
    }

    #[test]
    fn a_changed_artifact_is_refused_and_the_pin_kept() {
        let mut version: ModelVersion = load("modelversion.yaml", 1);
        let first = plan(&Observed {
            version: &version,
            now: Timestamp::UNIX_EPOCH,
        });
        version.status = Some(first.status);
        version.metadata.generation = Some(2);
        let original = version.spec.artifact.sha256.clone();
        version.spec.artifact.sha256 = "0".repeat(64);
        let second = plan(&Observed {
            version: &version,
            now: Timestamp::UNIX_EPOCH,
        });
        assert_eq!(
            second.status.accepted_artifact.map(|a| a.sha256),
            Some(original)
        );
        let (status, message, generation) = condition(&second.status.conditions, "InvalidSpec");
        assert_eq!((status, generation), ("True", Some(2)));
        assert!(message.starts_with("spec.artifact"), "{message}");
    }

    #[test]
    fn an_invalid_first_spec_pins_nothing() {
        let mut version: ModelVersion = load("modelversion.yaml", 1);
        version.spec.validation.gates[2].min = Some(2.0);
        let plan = plan(&Observed {
            version: &version,
            now: Timestamp::UNIX_EPOCH,
        });
        assert!(plan.status.accepted_artifact.is_none());
    }
}
