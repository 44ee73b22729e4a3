//! TrainingJob controller. Today: validates the spec and reports it with the topology summary; pods, gang
//! admission, restarts and the produced ModelVersion come with the training work.

use std::sync::Arc;

use flywheel_crds::TrainingJob;
use flywheel_crds::common::ConditionStatus;
use flywheel_crds::trainingjob::TrainingJobStatus;
use jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use crate::controller::{Context, Error, apply_plan, run_controller};
use crate::plan::{Plan, spec_conditions};

pub const KIND: &str = "TrainingJob";

pub struct Observed<'a> {
    pub job: &'a TrainingJob,
    pub now: Timestamp,
}

pub fn plan(observed: &Observed<'_>) -> Plan<TrainingJobStatus> {
    let job = observed.job;
    let generation = job.metadata.generation;
    let mut status = job.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    status.topology = Some(job.spec.topology.summary());
    let events = spec_conditions(
        &mut status.conditions,
        &job.spec.validate(),
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

pub async fn reconcile(job: Arc<TrainingJob>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    let plan = plan(&Observed {
        job: &job,
        now: Timestamp::now(),
    });
    let api = Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    apply_plan(&ctx, &api, job.as_ref(), KIND, job.status.as_ref(), plan).await
}

pub async fn run(ctx: Arc<Context>, stop: impl Future<Output = ()> + Send + Sync + 'static) {
    run_controller::<TrainingJob, _, _>(KIND, ctx, stop, reconcile).await;
}
