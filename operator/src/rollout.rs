//! Rollout controller. Today: validates the spec and reports it with the step count; serving workloads,
//! traffic weights, analysis and rollback come with the rollout work.

use std::sync::Arc;

use flywheel_crds::Rollout;
use flywheel_crds::common::ConditionStatus;
use flywheel_crds::rollout::RolloutStatus;
use jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use crate::controller::{Context, Error, apply_plan, run_controller};
use crate::plan::{Plan, spec_conditions};

pub const KIND: &str = "Rollout";

pub struct Observed<'a> {
    pub rollout: &'a Rollout,
    pub now: Timestamp,
}

pub fn plan(observed: &Observed<'_>) -> Plan<RolloutStatus> {
    let rollout = observed.rollout;
    let generation = rollout.metadata.generation;
    let mut status = rollout.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    let steps = rollout.spec.effective_steps().len();
    status.step_summary = Some(format!("{}/{steps}", status.current_step.unwrap_or(0)));
    let events = spec_conditions(
        &mut status.conditions,
        &rollout.spec.validate(),
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

pub async fn reconcile(rollout: Arc<Rollout>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    let plan = plan(&Observed {
        rollout: &rollout,
        now: Timestamp::now(),
    });
    let api = Api::namespaced(ctx.client.clone(), &rollout.namespace().unwrap_or_default());
    apply_plan(
        &ctx,
        &api,
        rollout.as_ref(),
        KIND,
        rollout.status.as_ref(),
        plan,
    )
    .await
}

pub async fn run(ctx: Arc<Context>, stop: impl Future<Output = ()> + Send + Sync + 'static) {
    run_controller::<Rollout, _, _>(KIND, ctx, stop, reconcile).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::examples::{condition, load};

    #[test]
    fn step_summary_counts_the_effective_steps() {
        let mut rollout: Rollout = load("rollout.yaml", 1);
        let plan_of = |rollout: &Rollout| {
            plan(&Observed {
                rollout,
                now: Timestamp::UNIX_EPOCH,
            })
        };
        assert_eq!(
            plan_of(&rollout).status.step_summary.as_deref(),
            Some("0/7")
        );
        rollout.spec.strategy.canary.steps.clear();
        let default = plan_of(&rollout);
        assert_eq!(
            default.status.step_summary.as_deref(),
            Some("0/4"),
            "default is 1 → 5 → 20 → 100"
        );
        assert_eq!(condition(&default.status.conditions, "Ready").0, "True");
    }

    #[test]
    fn weights_above_100_and_decreasing_are_both_named() {
        use flywheel_crds::rollout::CanaryStep;
        let mut rollout: Rollout = load("rollout.yaml", 1);
        rollout.spec.strategy.canary.steps = vec![
            CanaryStep::SetWeight(50),
            CanaryStep::SetWeight(20),
            CanaryStep::SetWeight(150),
        ];
        let plan = plan(&Observed {
            rollout: &rollout,
            now: Timestamp::UNIX_EPOCH,
        });
        let (_, message, _) = condition(&plan.status.conditions, "InvalidSpec");
        assert!(
            message.contains("spec.strategy.canary.steps[1].setWeight"),
            "{message}"
        );
        assert!(
            message.contains("spec.strategy.canary.steps[2].setWeight: 150 is above 100"),
            "{message}"
        );
    }
}
