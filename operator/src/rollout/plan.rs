//! The Rollout state machine, pure: which version is stable, which is the canary and at what weight, from the
//! spec, the status (all progress lives there), the target ModelVersion's verdict, this round's analysis,
//! firing alerts and a manual action. No I/O and no clock: the caller passes `now` and what it observed.
//!
//! A progression starts when `spec.modelVersion` names a Validated version other than the stable one. Each
//! `setWeight` step holds until `analysis.count` rounds passed; a `pause` until its duration ran out (or, without
//! one, until promoted). Analysis runs every `interval` after `initialDelay` while a canary takes traffic:
//! failures beyond `failureLimit` and any configured alert abort (canary weight 0, `Degraded`); inconclusive
//! rounds beyond `inconclusiveLimit` and errors beyond `consecutiveErrorLimit` pause. After the last step the
//! canary becomes stable.

use std::time::Duration;

use flywheel_crds::Rollout;
use flywheel_crds::common::{
    CONDITION_READY, ConditionStatus, condition, find_condition, set_condition,
};
use flywheel_crds::rollout::{CanaryStep, RolloutPhase, RolloutStatus};
use jiff::Timestamp;

use super::children;
use super::health::VersionPods;
use super::online::{self};
use crate::plan::{Plan, PlannedEvent, spec_conditions};
use crate::rollout::traffic;

pub use super::observed::{ACTION_ANNOTATION, Action, Observed, analysis_due, pending_action};
use super::observed::{duration, elapsed_since};
pub use super::steps::MAX_MEASUREMENTS;
use super::steps::{Builder, decide};

pub const CONDITION_HEALTHY: &str = "Healthy";
/// Whether the sink of `spec.feedback.trafficLog` runs; absent when the Rollout logs no traffic.
pub const CONDITION_TRAFFIC_LOGGED: &str = "TrafficLogged";
const IDLE_REQUEUE: Duration = Duration::from_secs(60);
/// How often a step waiting for the canary's pods looks again.
const WAIT_REQUEUE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq)]
pub struct RolloutPlan {
    pub plan: Plan<RolloutStatus>,
    /// The canary was aborted on this reconcile.
    pub aborted: Option<String>,
    /// The route table to send every router pod now, not waiting for the mounted ConfigMap to refresh: the
    /// split changed, the canary was aborted, or a router's table drifted.
    pub push_routes: Option<serde_json::Value>,
}

/// The next time something happens by itself: an analysis round or the end of a timed pause.
fn requeue_after(rollout: &Rollout, status: &RolloutStatus, now: Timestamp) -> Duration {
    if status.waiting_for.is_some() {
        return WAIT_REQUEUE;
    }
    if !matches!(
        status.phase,
        Some(RolloutPhase::Progressing | RolloutPhase::Paused)
    ) {
        return IDLE_REQUEUE;
    }
    let mut next = IDLE_REQUEUE;
    if let Some(analysis) = &rollout.spec.analysis {
        let interval = duration(&analysis.interval);
        let delay = analysis
            .initial_delay
            .as_ref()
            .map_or(Duration::ZERO, duration);
        let in_step = elapsed_since(status.step_started_at.as_ref(), now);
        let until = if status.last_analysis_at.is_none() {
            delay.saturating_sub(in_step)
        } else {
            interval.saturating_sub(elapsed_since(status.last_analysis_at.as_ref(), now))
        };
        next = next.min(until);
    }
    let steps = rollout.spec.effective_steps();
    if let Some(CanaryStep::Pause(pause)) = steps.get(status.current_step.unwrap_or(0) as usize)
        && let Some(length) = &pause.duration
    {
        next = next.min(
            duration(length).saturating_sub(elapsed_since(status.step_started_at.as_ref(), now)),
        );
    }
    next.max(Duration::from_millis(200))
}

pub fn plan(observed: &Observed<'_>) -> Result<RolloutPlan, serde_json::Error> {
    let rollout = observed.rollout;
    let generation = rollout.metadata.generation;
    let mut status = rollout.status.clone().unwrap_or_default();
    status.observed_generation = generation;
    // spec_conditions sets a provisional Ready; the real one (serving or not) is decided after the step.
    let previous_ready = find_condition(&status.conditions, CONDITION_READY).cloned();
    let mut violations = rollout.spec.validate().err().unwrap_or_default();
    online::check(&observed.online, observed.target, &mut violations);
    let validation = violations.into_result();
    let valid = validation.is_ok();
    let events = spec_conditions(
        &mut status.conditions,
        &validation,
        generation,
        observed.now,
        (ConditionStatus::True, "SpecAccepted", "the spec is valid"),
    );
    let mut b = Builder {
        observed,
        status,
        events,
        aborted: None,
    };
    if valid {
        decide(&mut b);
    }
    let steps = rollout.spec.effective_steps().len();
    b.status.step_summary = Some(format!(
        "{}/{steps}",
        b.status.current_step.unwrap_or(0).min(steps as u32)
    ));
    let (healthy, reason, message) = match b.status.phase {
        Some(RolloutPhase::Healthy) => (
            ConditionStatus::True,
            "Healthy",
            format!(
                "serving {}",
                b.status.stable_version.as_deref().unwrap_or_default()
            ),
        ),
        Some(RolloutPhase::Progressing) => (
            ConditionStatus::False,
            "Progressing",
            match &b.status.waiting_for {
                Some(waiting) => format!("at {}%, waiting for {waiting}", b.status.canary_weight),
                None => format!(
                    "{} at {}%",
                    b.status.canary_version.as_deref().unwrap_or_default(),
                    b.status.canary_weight
                ),
            },
        ),
        Some(RolloutPhase::Paused) => (
            ConditionStatus::False,
            "Paused",
            b.status.pause_reason.clone().unwrap_or_default(),
        ),
        Some(RolloutPhase::Degraded) => (
            ConditionStatus::False,
            "Aborted",
            b.status.abort_reason.clone().unwrap_or_default(),
        ),
        None => (
            ConditionStatus::False,
            "NothingServed",
            b.status
                .pause_reason
                .clone()
                .unwrap_or_else(|| "no version served yet".to_owned()),
        ),
    };
    set_condition(
        &mut b.status.conditions,
        condition(
            CONDITION_HEALTHY,
            healthy,
            reason,
            message,
            generation,
            observed.now,
        ),
    );
    // Ready means serving: a stable version whose every replica is available.
    let serving = if valid {
        let (ready, reason, message) = readiness(&b.status, observed.stable_pods.as_ref());
        // Compared with the last reconcile's Ready, not the provisional one: the transition time moves
        // only when serving starts or stops.
        b.status.conditions.retain(|c| c.type_ != CONDITION_READY);
        b.status.conditions.extend(previous_ready.clone());
        set_condition(
            &mut b.status.conditions,
            condition(
                CONDITION_READY,
                ready,
                reason,
                message,
                generation,
                observed.now,
            ),
        );
        ready == ConditionStatus::True
    } else {
        false
    };
    traffic_logged(&mut b, generation);
    let restore_routes = !observed.drifted_routers.is_empty();
    if restore_routes {
        b.events.push(PlannedEvent {
            warning: true,
            reason: "RoutesDrifted",
            action: "RestoreRoutes",
            note: format!(
                "router pod(s) {} served a route table the operator did not set; it was set back",
                observed.drifted_routers.join(", ")
            ),
        });
    }
    let mut requeue = requeue_after(rollout, &b.status, observed.now);
    if valid && !serving && b.status.stable_version.is_some() {
        requeue = requeue.min(WAIT_REQUEUE);
    }
    let children = children::plan(
        &children::Inputs {
            rollout,
            versions: observed.versions,
            owned: observed.owned,
            online: &observed.online,
            serving: observed.serving,
            credentials_digest: observed.credentials_digest,
        },
        &b.status,
    )?;
    let split = children::split_of(&b.status);
    let split_changed = rollout.status.as_ref().and_then(children::split_of) != split;
    let push_routes = split
        .filter(|_| b.aborted.is_some() || restore_routes || split_changed)
        .map(|split| {
            let name = rollout.metadata.name.as_deref().unwrap_or_default();
            let namespace = rollout.metadata.namespace.as_deref().unwrap_or_default();
            traffic::route_table(name, namespace, &split)
        });
    Ok(RolloutPlan {
        plan: Plan {
            status: b.status,
            events: b.events,
            requeue: Some(requeue),
            children,
            finalizer: None,
        },
        aborted: b.aborted,
        push_routes,
    })
}

/// The `TrafficLogged` condition: the sink's pod is available, or what it is doing instead (a broker that
/// refuses its credentials ends it at start, with the reason). A Warning Event when it stops.
fn traffic_logged(b: &mut Builder<'_>, generation: Option<i64>) {
    let observed = b.observed;
    let log = observed
        .rollout
        .spec
        .feedback
        .as_ref()
        .and_then(|f| f.traffic_log.as_ref());
    let Some(log) = log else {
        b.status
            .conditions
            .retain(|c| c.type_ != CONDITION_TRAFFIC_LOGGED);
        return;
    };
    let was_logging = find_condition(&b.status.conditions, CONDITION_TRAFFIC_LOGGED)
        .is_some_and(|c| c.status == "True");
    let (status, reason, message) = match &observed.traffic_log_pods {
        Some(pods) if pods.all_available() => (
            ConditionStatus::True,
            "Logging",
            format!("writing the prediction log and clicks to {}", log.uri),
        ),
        Some(pods) => (
            ConditionStatus::False,
            "SinkUnavailable",
            format!("the traffic log sink is not running: {}", pods.describe()),
        ),
        None => (
            ConditionStatus::False,
            "SinkUnavailable",
            "the traffic log sink is not created yet".to_owned(),
        ),
    };
    if was_logging && status == ConditionStatus::False {
        b.events.push(PlannedEvent {
            warning: true,
            reason: "TrafficLogStopped",
            action: "LogTraffic",
            note: message.clone(),
        });
    }
    set_condition(
        &mut b.status.conditions,
        condition(
            CONDITION_TRAFFIC_LOGGED,
            status,
            reason,
            message,
            generation,
            observed.now,
        ),
    );
}

/// The `Ready` condition: serving once the stable version's every replica is available.
fn readiness(
    status: &RolloutStatus,
    stable_pods: Option<&VersionPods>,
) -> (ConditionStatus, &'static str, String) {
    let Some(stable) = status.stable_version.as_deref() else {
        let why = status
            .pause_reason
            .clone()
            .unwrap_or_else(|| "no version served yet".to_owned());
        return (ConditionStatus::False, "NotServing", why);
    };
    match stable_pods {
        Some(pods) if pods.all_available() => (
            ConditionStatus::True,
            "Serving",
            format!("serving {stable}"),
        ),
        Some(pods) => (
            ConditionStatus::False,
            "NotServing",
            format!("{stable}: {}", pods.describe()),
        ),
        None => (
            ConditionStatus::False,
            "NotServing",
            format!("{stable}: its Deployment does not exist yet"),
        ),
    }
}

#[cfg(test)]
mod tests;
