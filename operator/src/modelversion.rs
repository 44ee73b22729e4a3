//! ModelVersion controller: validates the spec, pins the artifact accepted first so a later edit of it is
//! refused (the controller-side mirror of the CEL immutability rule), and evaluates the validation gates into
//! `Validated` or `Rejected`. Aliases and the in-use finalizer come with the Rollout controller.

use std::sync::Arc;

use flywheel_crds::ModelVersion;
use flywheel_crds::common::ConditionStatus;
use flywheel_crds::common::{condition, set_condition};
use flywheel_crds::modelversion::{
    AcceptedArtifact, Baseline, ModelVersionPhase, ModelVersionStatus,
};
use jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use kube::runtime::reflector::Store;
use kube::runtime::{Controller, watcher};

use crate::controller::{Context, Error, apply_plan, run_controller_with};
use crate::gates::{self, ResolvedBaseline};
use crate::plan::{Plan, PlannedEvent, spec_conditions};

pub const KIND: &str = "ModelVersion";

pub struct Observed<'a> {
    pub version: &'a ModelVersion,
    /// The other ModelVersions of its namespace (gate baselines).
    pub others: &'a [Arc<ModelVersion>],
    pub now: Timestamp,
}

/// How long a version whose baseline is missing waits before looking again.
const BASELINE_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

fn resolve<'a>(
    baseline: &'a Baseline,
    version: &ModelVersion,
    others: &'a [Arc<ModelVersion>],
) -> ResolvedBaseline<'a> {
    match baseline {
        Baseline::ModelVersion(name) => others
            .iter()
            .find(|other| other.metadata.name.as_deref() == Some(name.as_str()))
            .map_or(ResolvedBaseline::Missing(name), |other| {
                ResolvedBaseline::Version(name, &other.spec.metrics)
            }),
        Baseline::Alias(alias) => others
            .iter()
            .filter(|other| other.metadata.name != version.metadata.name)
            .filter(|other| other.spec.model_name == version.spec.model_name)
            .find(|other| {
                other
                    .status
                    .as_ref()
                    .is_some_and(|s| s.aliases.iter().any(|a| a == alias))
            })
            .map_or(ResolvedBaseline::UnheldAlias(alias), |other| {
                ResolvedBaseline::Version(
                    other.metadata.name.as_deref().unwrap_or_default(),
                    &other.spec.metrics,
                )
            }),
    }
}

pub fn plan(observed: &Observed<'_>) -> Plan<ModelVersionStatus> {
    let version = observed.version;
    let generation = version.metadata.generation;
    let mut status = version.status.clone().unwrap_or_default();
    let previous_generation = status.observed_generation;
    status.observed_generation = generation;
    let validation = version.spec.validate(status.accepted_artifact.as_ref());
    if validation.is_ok() && status.accepted_artifact.is_none() {
        status.accepted_artifact = Some(AcceptedArtifact {
            uri: version.spec.artifact.uri.clone(),
            sha256: version.spec.artifact.sha256.clone(),
        });
    }
    let valid = validation.is_ok();
    let mut events = spec_conditions(
        &mut status.conditions,
        &validation,
        generation,
        observed.now,
        (ConditionStatus::True, "SpecAccepted", "the spec is valid"),
    );
    let mut requeue = None;
    // A verdict is final for its generation: a baseline that moves later does not flip a version already
    // validated (it may be rolling out).
    let decided = matches!(
        status.phase,
        Some(ModelVersionPhase::Validated | ModelVersionPhase::Rejected)
    ) && previous_generation == generation;
    if valid && !decided {
        let results: Vec<_> = version
            .spec
            .validation
            .gates
            .iter()
            .map(|gate| {
                let baseline = gate
                    .baseline
                    .as_ref()
                    .map(|b| resolve(b, version, observed.others));
                gates::evaluate(gate, &version.spec.metrics, baseline.as_ref())
            })
            .collect();
        let phase = gates::phase_of(&results);
        let summary = gates::summary(&results);
        let (condition_status, reason) = match phase {
            ModelVersionPhase::Validated => (ConditionStatus::True, "GatesPassed"),
            ModelVersionPhase::Rejected => (ConditionStatus::False, "GateFailed"),
            ModelVersionPhase::Pending => (ConditionStatus::Unknown, "GatesPending"),
        };
        if status.phase != Some(phase) && phase != ModelVersionPhase::Pending {
            events.push(PlannedEvent {
                warning: phase == ModelVersionPhase::Rejected,
                reason,
                action: "Validate",
                note: summary.clone(),
            });
        }
        if phase == ModelVersionPhase::Pending {
            requeue = Some(BASELINE_RETRY);
        }
        set_condition(
            &mut status.conditions,
            condition(
                CONDITION_VALIDATED,
                condition_status,
                reason,
                summary,
                generation,
                observed.now,
            ),
        );
        status.phase = Some(phase);
        status.gate_results = results;
    }
    Plan {
        status,
        events,
        requeue,
    }
}

pub const CONDITION_VALIDATED: &str = "Validated";

pub async fn reconcile(
    version: Arc<ModelVersion>,
    ctx: Arc<Context>,
    store: &Store<ModelVersion>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    let namespace = version.namespace();
    let others: Vec<Arc<ModelVersion>> = store
        .state()
        .into_iter()
        .filter(|other| other.namespace() == namespace)
        .collect();
    let plan = plan(&Observed {
        version: &version,
        others: &others,
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
    // The controller's own cache of every ModelVersion resolves gate baselines without extra requests.
    let controller = Controller::new(
        Api::<ModelVersion>::all(ctx.client.clone()),
        watcher::Config::default(),
    );
    let store = controller.store();
    run_controller_with(KIND, controller, ctx, stop, move |version, ctx| {
        let store = store.clone();
        async move { reconcile(version, ctx, &store).await }
    })
    .await;
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
            others: &[],
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
            others: &[],
            now: Timestamp::UNIX_EPOCH,
        });
        version.status = Some(first.status);
        version.metadata.generation = Some(2);
        let original = version.spec.artifact.sha256.clone();
        version.spec.artifact.sha256 = "0".repeat(64);
        let second = plan(&Observed {
            version: &version,
            others: &[],
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
            others: &[],
            now: Timestamp::UNIX_EPOCH,
        });
        assert!(plan.status.accepted_artifact.is_none());
    }

    fn planned(version: &ModelVersion, others: &[Arc<ModelVersion>]) -> Plan<ModelVersionStatus> {
        plan(&Observed {
            version,
            others,
            now: Timestamp::UNIX_EPOCH,
        })
    }

    #[test]
    fn passing_gates_validate_with_each_result_recorded() {
        let version: ModelVersion = load("modelversion.yaml", 1);
        let plan = planned(&version, &[]);
        assert_eq!(plan.status.phase, Some(ModelVersionPhase::Validated));
        assert_eq!(plan.status.gate_results.len(), 3);
        assert_eq!(condition(&plan.status.conditions, "Validated").0, "True");
        assert!(
            plan.events
                .iter()
                .any(|e| e.reason == "GatesPassed" && !e.warning)
        );
    }

    #[test]
    fn a_failing_gate_rejects_with_the_value_and_threshold() {
        let mut version: ModelVersion = load("modelversion.yaml", 1);
        version.spec.metrics.auc = Some(0.70);
        let plan = planned(&version, &[]);
        assert_eq!(plan.status.phase, Some(ModelVersionPhase::Rejected));
        let (status, message, _) = condition(&plan.status.conditions, "Validated");
        assert_eq!(status, "False");
        assert!(message.contains("auc 0.7 failed >= 0.75"), "{message}");
        assert!(
            plan.events
                .iter()
                .any(|e| e.reason == "GateFailed" && e.warning)
        );
    }

    #[test]
    fn relative_gates_use_the_alias_holder_and_the_verdict_stays() {
        let mut production: ModelVersion = load("modelversion.yaml", 1);
        production.metadata.name = Some("ctr-v1".into());
        production.spec.metrics.auc = Some(0.79);
        production.status = Some(ModelVersionStatus {
            aliases: vec!["production".into()],
            ..ModelVersionStatus::default()
        });
        let mut candidate: ModelVersion = load("modelversion.yaml", 1);
        candidate.metadata.name = Some("ctr-v2".into());
        candidate
            .spec
            .validation
            .gates
            .push(flywheel_crds::modelversion::Gate {
                metric: flywheel_crds::modelversion::GateMetric::Auc,
                min: None,
                max: None,
                baseline: Some(Baseline::Alias("production".into())),
                max_decrease: Some(0.002),
                max_increase: None,
            });
        let others = vec![Arc::new(production.clone())];
        let rejected = planned(&candidate, &others);
        assert_eq!(
            rejected.status.phase,
            Some(ModelVersionPhase::Rejected),
            "0.781 < 0.79 - 0.002"
        );
        // Decided: a better baseline later does not flip it back, nor a worse one flip a validated version.
        candidate.status = Some(rejected.status);
        production.spec.metrics.auc = Some(0.70);
        let again = planned(&candidate, &[Arc::new(production)]);
        assert_eq!(again.status.phase, Some(ModelVersionPhase::Rejected));
        assert!(again.events.is_empty());
    }

    #[test]
    fn a_missing_baseline_version_waits_and_looks_again() {
        let mut version: ModelVersion = load("modelversion.yaml", 1);
        version.spec.validation.gates[0].baseline = Some(Baseline::ModelVersion("ctr-v0".into()));
        version.spec.validation.gates[0].max_decrease = Some(0.01);
        let plan = planned(&version, &[]);
        assert_eq!(plan.status.phase, Some(ModelVersionPhase::Pending));
        assert_eq!(plan.requeue, Some(BASELINE_RETRY));
        let (status, message, _) = condition(&plan.status.conditions, "Validated");
        assert_eq!(status, "Unknown");
        assert!(message.contains("ctr-v0 not found"), "{message}");
    }
}
