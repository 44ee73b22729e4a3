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
