//! The ModelVersion's plan, pure: the pinned artifact, the gates' verdict (`Validated` or `Rejected`), the
//! aliases and `servedBy` derived from the Rollouts of its namespace, and the in-use finalizer.

use std::sync::Arc;

use flywheel_crds::common::{ConditionStatus, condition, set_condition};
use flywheel_crds::modelversion::{
    AcceptedArtifact, Baseline, IN_USE_FINALIZER, ModelVersionPhase, ModelVersionStatus,
    PromotionRecord, ServedBy, ServingRole,
};
use flywheel_crds::rollout::RolloutPhase;
use flywheel_crds::{ModelVersion, Rollout};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::gates::{self, ResolvedBaseline};
use crate::plan::{Children, FinalizerChange, Plan, PlannedEvent, spec_conditions};

pub struct Observed<'a> {
    pub version: &'a ModelVersion,
    /// The other ModelVersions of its namespace (gate baselines).
    pub others: &'a [Arc<ModelVersion>],
    /// The Rollouts of its namespace (aliases, in-use).
    pub rollouts: &'a [Arc<Rollout>],
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
        let ungated = results.is_empty();
        let (condition_status, reason, summary) = match phase {
            // Nothing was compared: valid, but never silently so.
            ModelVersionPhase::Validated if ungated => (
                ConditionStatus::True,
                "NoGates",
                "no gates: the version was compared with nothing; set spec.validation.gates (or the \
                 TrainingJob's spec.validation)"
                    .to_owned(),
            ),
            ModelVersionPhase::Validated => (
                ConditionStatus::True,
                "GatesPassed",
                gates::summary(&results),
            ),
            ModelVersionPhase::Rejected => (
                ConditionStatus::False,
                "GateFailed",
                gates::summary(&results),
            ),
            ModelVersionPhase::Pending => (
                ConditionStatus::Unknown,
                "GatesPending",
                gates::summary(&results),
            ),
        };
        if status.phase != Some(phase) && phase != ModelVersionPhase::Pending {
            events.push(PlannedEvent {
                warning: phase == ModelVersionPhase::Rejected || ungated,
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
    usage(observed, &mut status, &mut events);
    let finalizer = finalizer_change(version, !status.served_by.is_empty());
    Plan {
        status,
        events,
        requeue,
        children: Children::default(),
        finalizer,
    }
}

/// The in-use finalizer follows whether a Rollout serves the version: a served version cannot be deleted, and
/// one no longer served is let go (its deletion, if asked for, then finishes).
fn finalizer_change(version: &ModelVersion, in_use: bool) -> Option<FinalizerChange> {
    let has_finalizer = version.finalizers().iter().any(|f| f == IN_USE_FINALIZER);
    match (in_use, has_finalizer) {
        (true, false) => Some(FinalizerChange::Add(IN_USE_FINALIZER)),
        (false, true) => Some(FinalizerChange::Remove(IN_USE_FINALIZER)),
        _ => None,
    }
}

pub const CONDITION_VALIDATED: &str = "Validated";
pub const CONDITION_IN_USE: &str = "InUse";
pub const ALIAS_PRODUCTION: &str = "production";
pub const ALIAS_CANARY: &str = "canary";
const MAX_HISTORY: usize = 20;

/// Which Rollouts serve this version, as stable (`production`) or as a live canary (`canary`).
fn usage(observed: &Observed<'_>, status: &mut ModelVersionStatus, events: &mut Vec<PlannedEvent>) {
    let name = observed
        .version
        .metadata
        .name
        .as_deref()
        .unwrap_or_default();
    let mut served_by = Vec::new();
    let mut aliases: Vec<(String, String)> = Vec::new();
    for rollout in observed.rollouts {
        let Some(rollout_status) = &rollout.status else {
            continue;
        };
        let rollout_name = rollout.metadata.name.clone().unwrap_or_default();
        if rollout_status.stable_version.as_deref() == Some(name) {
            served_by.push(ServedBy {
                rollout: rollout_name.clone(),
                role: ServingRole::Stable,
            });
            aliases.push((ALIAS_PRODUCTION.to_owned(), rollout_name.clone()));
        }
        let canary_live = matches!(
            rollout_status.phase,
            Some(RolloutPhase::Progressing | RolloutPhase::Paused)
        );
        if canary_live && rollout_status.canary_version.as_deref() == Some(name) {
            served_by.push(ServedBy {
                rollout: rollout_name.clone(),
                role: ServingRole::Canary,
            });
            aliases.push((ALIAS_CANARY.to_owned(), rollout_name));
        }
    }
    let now = Time(observed.now);
    let new_aliases: Vec<String> = {
        let mut names: Vec<String> = aliases.iter().map(|(alias, _)| alias.clone()).collect();
        names.sort();
        names.dedup();
        names
    };
    for (alias, rollout) in &aliases {
        if !status.aliases.contains(alias) {
            status.promotion_history.push(PromotionRecord {
                alias: alias.clone(),
                action: "Promoted".to_owned(),
                rollout: Some(rollout.clone()),
                time: now.clone(),
            });
            if alias == ALIAS_PRODUCTION {
                events.push(PlannedEvent {
                    warning: false,
                    reason: "Promoted",
                    action: "Alias",
                    note: format!("{alias} (rollout {rollout})"),
                });
            }
        }
    }
    for alias in &status.aliases {
        if !new_aliases.contains(alias) {
            status.promotion_history.push(PromotionRecord {
                alias: alias.clone(),
                action: "Demoted".to_owned(),
                rollout: None,
                time: now.clone(),
            });
        }
    }
    let excess = status.promotion_history.len().saturating_sub(MAX_HISTORY);
    status.promotion_history.drain(..excess);
    status.aliases_summary = (!new_aliases.is_empty()).then(|| new_aliases.join(","));
    status.aliases = new_aliases;
    status.served_by = served_by;
    let deleting = observed.version.metadata.deletion_timestamp.is_some();
    let generation = observed.version.metadata.generation;
    if status.served_by.is_empty() {
        set_condition(
            &mut status.conditions,
            condition(
                CONDITION_IN_USE,
                ConditionStatus::False,
                "NotServed",
                "no Rollout serves this version",
                generation,
                observed.now,
            ),
        );
    } else {
        let serving = status
            .served_by
            .iter()
            .map(ServedBy::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let message = if deleting {
            format!(
                "deletion waits: served by {serving}; move the Rollout to another version first"
            )
        } else {
            format!("served by {serving}")
        };
        let was = status
            .conditions
            .iter()
            .find(|c| c.type_ == CONDITION_IN_USE)
            .map(|c| c.message.clone());
        if deleting && was.as_deref() != Some(message.as_str()) {
            events.push(PlannedEvent {
                warning: true,
                reason: "DeletionBlocked",
                action: "Delete",
                note: message.clone(),
            });
        }
        set_condition(
            &mut status.conditions,
            condition(
                CONDITION_IN_USE,
                ConditionStatus::True,
                "Served",
                message,
                generation,
                observed.now,
            ),
        );
    }
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
            rollouts: &[],
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
            rollouts: &[],
            now: Timestamp::UNIX_EPOCH,
        });
        version.status = Some(first.status);
        version.metadata.generation = Some(2);
        let original = version.spec.artifact.sha256.clone();
        version.spec.artifact.sha256 = "0".repeat(64);
        let second = plan(&Observed {
            version: &version,
            others: &[],
            rollouts: &[],
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
            rollouts: &[],
            now: Timestamp::UNIX_EPOCH,
        });
        assert!(plan.status.accepted_artifact.is_none());
    }

    fn planned(version: &ModelVersion, others: &[Arc<ModelVersion>]) -> Plan<ModelVersionStatus> {
        plan(&Observed {
            version,
            others,
            rollouts: &[],
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
    fn a_version_without_gates_says_it_was_compared_with_nothing() {
        let mut version: ModelVersion = load("modelversion.yaml", 1);
        version.spec.validation.gates.clear();
        let plan = planned(&version, &[]);
        assert_eq!(plan.status.phase, Some(ModelVersionPhase::Validated));
        let validated = plan
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == "Validated")
            .unwrap_or_else(|| panic!("no Validated condition"));
        assert_eq!(validated.reason, "NoGates");
        assert!(
            validated
                .message
                .starts_with("no gates: the version was compared with nothing"),
            "{}",
            validated.message
        );
        assert!(
            plan.events
                .iter()
                .any(|e| e.reason == "NoGates" && e.warning),
            "{:?}",
            plan.events
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

    #[test]
    fn the_stable_version_of_a_rollout_holds_production_and_loses_it_when_replaced() {
        let mut version: ModelVersion = load("modelversion.yaml", 1);
        version.metadata.name = Some("ctr-v1".into());
        let mut rollout: Rollout = load("rollout.yaml", 1);
        rollout.status = Some(flywheel_crds::rollout::RolloutStatus {
            stable_version: Some("ctr-v1".into()),
            phase: Some(RolloutPhase::Healthy),
            ..Default::default()
        });
        let rollouts = vec![Arc::new(rollout.clone())];
        let served = plan(&Observed {
            version: &version,
            others: &[],
            rollouts: &rollouts,
            now: Timestamp::UNIX_EPOCH,
        });
        assert_eq!(served.status.aliases, vec!["production"]);
        assert_eq!(
            served.status.served_by,
            vec![ServedBy {
                rollout: "ctr".into(),
                role: ServingRole::Stable
            }]
        );
        assert_eq!(served.status.promotion_history[0].action, "Promoted");
        assert_eq!(condition(&served.status.conditions, "InUse").0, "True");
        assert_eq!(
            served.finalizer,
            Some(FinalizerChange::Add(IN_USE_FINALIZER)),
            "a served version cannot be deleted"
        );
        version.status = Some(served.status);
        version.metadata.finalizers = Some(vec![IN_USE_FINALIZER.into()]);
        let steady = plan(&Observed {
            version: &version,
            others: &[],
            rollouts: &rollouts,
            now: Timestamp::UNIX_EPOCH,
        });
        assert_eq!(steady.finalizer, None, "already held");
        if let Some(status) = rollout.status.as_mut() {
            status.stable_version = Some("ctr-v2".into());
        }
        version.metadata.deletion_timestamp = None;
        let replaced = plan(&Observed {
            version: &version,
            others: &[],
            rollouts: &[Arc::new(rollout)],
            now: Timestamp::UNIX_EPOCH,
        });
        assert!(replaced.status.aliases.is_empty() && replaced.status.served_by.is_empty());
        assert_eq!(replaced.status.promotion_history.len(), 2);
        assert_eq!(replaced.status.promotion_history[1].action, "Demoted");
        assert_eq!(condition(&replaced.status.conditions, "InUse").0, "False");
        assert_eq!(
            replaced.finalizer,
            Some(FinalizerChange::Remove(IN_USE_FINALIZER)),
            "no longer served: a deletion may finish"
        );
    }
}
