//! GPUQuota controller. Today: validates the spec and reports it; usage accounting and admission come with
//! the TrainingJob gang-admission work.

use std::sync::Arc;

use flywheel_crds::GPUQuota;
use flywheel_crds::common::ConditionStatus;
use flywheel_crds::gpuquota::GPUQuotaStatus;
use jiff::Timestamp;
use kube::Api;
use kube::runtime::controller::Action;

use crate::controller::{Context, Error, apply_plan, run_controller};
use crate::plan::{Plan, spec_conditions};

pub const KIND: &str = "GPUQuota";

pub struct Observed<'a> {
    pub quota: &'a GPUQuota,
    pub now: Timestamp,
}

pub fn plan(observed: &Observed<'_>) -> Plan<GPUQuotaStatus> {
    let quota = observed.quota;
    let generation = quota.metadata.generation;
    let mut status = quota.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let events = spec_conditions(
        &mut status.conditions,
        &quota.spec.validate(),
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

pub async fn reconcile(quota: Arc<GPUQuota>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    let plan = plan(&Observed {
        quota: &quota,
        now: Timestamp::now(),
    });
    let api = Api::all(ctx.client.clone());
    apply_plan(
        &ctx,
        &api,
        quota.as_ref(),
        KIND,
        quota.status.as_ref(),
        plan,
    )
    .await
}

pub async fn run(ctx: Arc<Context>, stop: impl Future<Output = ()> + Send + Sync + 'static) {
    run_controller::<GPUQuota, _, _>(KIND, ctx, stop, reconcile).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::examples::{condition, load};

    #[test]
    fn example_quota_is_ready() {
        let quota: GPUQuota = load("gpuquota.yaml", 1);
        let plan = plan(&Observed {
            quota: &quota,
            now: Timestamp::UNIX_EPOCH,
        });
        assert_eq!(
            condition(&plan.status.conditions, "Ready"),
            ("True", "the spec is valid", Some(1))
        );
    }

    #[test]
    fn duplicate_and_unknown_resources_are_named() {
        let mut quota: GPUQuota = load("gpuquota.yaml", 1);
        quota.spec.limits[1].resource = "nvidia.com/gpu".into();
        quota.spec.limits.push(flywheel_crds::gpuquota::GpuLimit {
            resource: "intel.com/gpu".into(),
            count: 1,
        });
        let plan = plan(&Observed {
            quota: &quota,
            now: Timestamp::UNIX_EPOCH,
        });
        let (_, message, _) = condition(&plan.status.conditions, "InvalidSpec");
        assert!(
            message.contains("spec.limits[1].resource: `nvidia.com/gpu` is listed twice"),
            "{message}"
        );
        assert!(
            message.contains("spec.limits[2].resource: unknown GPU resource `intel.com/gpu`"),
            "{message}"
        );
    }
}
