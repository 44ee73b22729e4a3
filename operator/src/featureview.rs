//! FeatureView controller. Today: validates the spec and reports it; materialization, statistics and drift
//! come with the feature-store work.

use std::sync::Arc;

use flywheel_crds::FeatureView;
use flywheel_crds::common::ConditionStatus;
use flywheel_crds::featureview::FeatureViewStatus;
use jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use crate::controller::{Context, Error, apply_plan, run_controller};
use crate::plan::{Plan, spec_conditions};

pub const KIND: &str = "FeatureView";

pub struct Observed<'a> {
    pub view: &'a FeatureView,
    pub now: Timestamp,
}

pub fn plan(observed: &Observed<'_>) -> Plan<FeatureViewStatus> {
    let view = observed.view;
    let generation = view.metadata.generation;
    let mut status = view.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    status.entities_summary = Some(
        view.spec
            .entities
            .iter()
            .map(|e| e.join_key.as_str())
            .collect::<Vec<_>>()
            .join(","),
    );
    status.feature_count = i64::try_from(view.spec.features.len()).ok();
    let events = spec_conditions(
        &mut status.conditions,
        &view.spec.validate(),
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

pub async fn reconcile(view: Arc<FeatureView>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    let plan = plan(&Observed {
        view: &view,
        now: Timestamp::now(),
    });
    let api = Api::namespaced(ctx.client.clone(), &view.namespace().unwrap_or_default());
    apply_plan(&ctx, &api, view.as_ref(), KIND, view.status.as_ref(), plan).await
}

pub async fn run(ctx: Arc<Context>, stop: impl Future<Output = ()> + Send + Sync + 'static) {
    run_controller::<FeatureView, _, _>(KIND, ctx, stop, reconcile).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::examples::{condition, load};

    #[test]
    fn valid_view_is_ready_with_its_summary() {
        let view: FeatureView = load("featureview.yaml", 4);
        let plan = plan(&Observed {
            view: &view,
            now: Timestamp::UNIX_EPOCH,
        });
        assert_eq!(plan.status.observed_generation, Some(4));
        assert_eq!(
            plan.status.entities_summary.as_deref(),
            Some("user_id,ad_id")
        );
        assert_eq!(plan.status.feature_count, Some(6));
        assert_eq!(
            condition(&plan.status.conditions, "Ready"),
            ("True", "the spec is valid", Some(4))
        );
        assert!(plan.events.is_empty());
    }

    #[test]
    fn cross_of_an_unknown_feature_is_invalid() {
        let mut view: FeatureView = load("featureview.yaml", 1);
        if let Some(flywheel_crds::featureview::Transform::Cross(cross)) =
            &mut view.spec.features[4].transform
        {
            cross.features[1] = "nope".into();
        }
        let plan = plan(&Observed {
            view: &view,
            now: Timestamp::UNIX_EPOCH,
        });
        let (status, message, _) = condition(&plan.status.conditions, "InvalidSpec");
        assert_eq!(status, "True");
        assert!(
            message.starts_with("spec.features[4].transform.cross.features[1]"),
            "{message}"
        );
        assert_eq!(plan.events.len(), 1);
    }
}
