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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::examples::{condition, load};

    #[test]
    fn topology_summary_is_reported() {
        let job: TrainingJob = load("trainingjob-ps.yaml", 1);
        let ps = plan(&Observed {
            job: &job,
            now: Timestamp::UNIX_EPOCH,
        });
        assert_eq!(ps.status.topology.as_deref(), Some("ps 2x4"));
        assert_eq!(condition(&ps.status.conditions, "Ready").0, "True");
        let gpu: TrainingJob = load("trainingjob-gpu.yaml", 1);
        let dp = plan(&Observed {
            job: &gpu,
            now: Timestamp::UNIX_EPOCH,
        });
        assert_eq!(dp.status.topology.as_deref(), Some("dp 2x4 nvidia.com/gpu"));
    }

    #[test]
    fn gpu_job_without_a_queue_is_invalid() {
        let mut job: TrainingJob = load("trainingjob-gpu.yaml", 2);
        job.spec.queue = None;
        let plan = plan(&Observed {
            job: &job,
            now: Timestamp::UNIX_EPOCH,
        });
        let (status, message, generation) = condition(&plan.status.conditions, "InvalidSpec");
        assert_eq!((status, generation), ("True", Some(2)));
        assert!(message.contains("spec.queue"), "{message}");
    }

    #[test]
    fn evaluation_before_training_end_is_invalid() {
        let mut job: TrainingJob = load("trainingjob-ps.yaml", 1);
        if let Some(view) = &mut job.spec.data.feature_view {
            view.eval_range.start = view.train_range.start.clone();
        }
        let plan = plan(&Observed {
            job: &job,
            now: Timestamp::UNIX_EPOCH,
        });
        let (_, message, _) = condition(&plan.status.conditions, "InvalidSpec");
        assert!(
            message.contains("spec.data.featureView.evalRange.start"),
            "{message}"
        );
    }
}
