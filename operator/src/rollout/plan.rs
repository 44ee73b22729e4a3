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

use flywheel_crds::common::{
    CONDITION_READY, ConditionStatus, condition, find_condition, set_condition,
};
use flywheel_crds::modelversion::ModelVersionPhase;
use flywheel_crds::rollout::{
    CanaryStep, Measurement, MeasurementVerdict, OnError, RolloutPhase, RolloutStatus,
};
use flywheel_crds::{ModelVersion, Rollout};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::children;
use super::health::VersionPods;
use super::online::{self, OnlineView};
use crate::config::ServingSettings;
use crate::plan::{OwnedObject, Plan, PlannedEvent, spec_conditions};
use crate::rollout::analysis::Verdict;
use crate::rollout::traffic;

/// Annotation carrying a manual action: `promote`, `promote-full`, `abort` or `retry`, optionally followed by
/// `:<anything>` so the same action can be given again.
pub const ACTION_ANNOTATION: &str = "flywheel.dev/action";
pub const CONDITION_HEALTHY: &str = "Healthy";
/// Measurements kept in status (the oldest go first).
pub const MAX_MEASUREMENTS: usize = 100;
const IDLE_REQUEUE: Duration = Duration::from_secs(60);
/// How often a step waiting for the canary's pods looks again.
const WAIT_REQUEUE: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Promote,
    PromoteFull,
    Abort,
    Retry,
}

pub struct Observed<'a> {
    pub rollout: &'a Rollout,
    /// The ModelVersion `spec.modelVersion` names, when it exists.
    pub target: Option<&'a ModelVersion>,
    /// This reconcile's analysis round (metric name, verdict), when one was due and ran.
    pub analysis: Option<Vec<(String, Verdict)>>,
    /// Alert names firing for this rollout (Prometheus `ALERTS` and the Alertmanager webhook).
    pub firing: Vec<String>,
    /// The FeatureView `spec.onlineFeatures` names.
    pub online: OnlineView,
    /// Router pods whose live route table is not the one the status implies (changed behind the operator).
    pub drifted_routers: Vec<String>,
    /// The live canary's pods (`None` without a live canary).
    pub canary_pods: Option<VersionPods>,
    /// The stable version's pods (`None` without a stable version).
    pub stable_pods: Option<VersionPods>,
    /// The ModelVersions the rollout may serve (stable, canary, target) that exist.
    pub versions: &'a [&'a ModelVersion],
    /// The Deployments and Services labelled with this rollout, from the cache (swept when not planned).
    pub owned: &'a [OwnedObject],
    pub serving: &'a ServingSettings,
    /// Digest of the rollout's credentials, stamped on its pod templates.
    pub credentials_digest: &'a str,
    pub now: Timestamp,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RolloutPlan {
    pub plan: Plan<RolloutStatus>,
    /// The canary was aborted on this reconcile.
    pub aborted: Option<String>,
    /// The route table to send every router pod now, not waiting for the mounted ConfigMap to refresh: the
    /// split changed, the canary was aborted, or a router's table drifted.
    pub push_routes: Option<serde_json::Value>,
}

/// The manual action the annotation asks for, unless it was already handled.
pub fn pending_action(rollout: &Rollout) -> Option<(String, Action)> {
    let value = rollout
        .metadata
        .annotations
        .as_ref()?
        .get(ACTION_ANNOTATION)?;
    let handled = rollout.status.as_ref().and_then(|s| s.last_action.as_ref());
    if handled == Some(value) {
        return None;
    }
    let action = match value.split(':').next().unwrap_or_default() {
        "promote" => Action::Promote,
        "promote-full" => Action::PromoteFull,
        "abort" => Action::Abort,
        "retry" => Action::Retry,
        _ => return None,
    };
    Some((value.clone(), action))
}

fn duration(text: &flywheel_crds::common::Duration) -> Duration {
    text.parse().unwrap_or(Duration::ZERO)
}

fn elapsed_since(since: Option<&Time>, now: Timestamp) -> Duration {
    since
        .map(|t| now.duration_since(t.0))
        .and_then(|d| Duration::try_from(d).ok())
        .unwrap_or(Duration::ZERO)
}

/// Whether an analysis round is due now (the caller then queries Prometheus and plans with the results).
pub fn analysis_due(rollout: &Rollout, now: Timestamp) -> bool {
    let (Some(analysis), Some(status)) = (&rollout.spec.analysis, &rollout.status) else {
        return false;
    };
    if status.canary_version.is_none()
        || status.canary_weight == 0
        || !matches!(
            status.phase,
            Some(RolloutPhase::Progressing | RolloutPhase::Paused)
        )
        || halted(rollout, status)
    {
        return false;
    }
    let delay = analysis
        .initial_delay
        .as_ref()
        .map_or(Duration::ZERO, duration);
    if elapsed_since(status.step_started_at.as_ref(), now) < delay {
        return false;
    }
    status.last_analysis_at.is_none()
        || elapsed_since(status.last_analysis_at.as_ref(), now) >= duration(&analysis.interval)
}

/// Analysis stopped for a human: too many inconclusive rounds or errors.
fn halted(rollout: &Rollout, status: &RolloutStatus) -> bool {
    rollout.spec.analysis.as_ref().is_some_and(|analysis| {
        status.inconclusive_measurements > analysis.inconclusive_limit
            || status.consecutive_errors > analysis.consecutive_error_limit
    })
}

struct Builder<'a> {
    observed: &'a Observed<'a>,
    status: RolloutStatus,
    events: Vec<PlannedEvent>,
    aborted: Option<String>,
}

impl Builder<'_> {
    fn event(&mut self, warning: bool, reason: &'static str, note: String) {
        self.events.push(PlannedEvent {
            warning,
            reason,
            action: "Rollout",
            note,
        });
    }

    fn start_progression(&mut self, version: &str) {
        let now = self.observed.now;
        self.status.canary_version = Some(version.to_owned());
        self.status.current_step = Some(0);
        self.status.canary_weight = 0;
        self.status.step_started_at = Some(Time(now));
        self.status.failed_measurements = 0;
        self.status.inconclusive_measurements = 0;
        self.status.consecutive_errors = 0;
        self.status.step_analysis_runs = 0;
        self.status.last_analysis_at = None;
        self.status.measurements.clear();
        self.status.abort_reason = None;
        self.status.pause_reason = None;
        self.status.phase = Some(RolloutPhase::Progressing);
        let stable = self.status.stable_version.clone().unwrap_or_default();
        self.event(
            false,
            "Progressing",
            format!("rolling out {version} over {stable}"),
        );
    }

    fn abort(&mut self, reason: String) {
        self.status.canary_weight = 0;
        self.status.phase = Some(RolloutPhase::Degraded);
        self.status.pause_reason = None;
        self.status.abort_reason = Some(reason.clone());
        let canary = self.status.canary_version.clone().unwrap_or_default();
        self.event(true, "Aborted", format!("{canary} rolled back: {reason}"));
        self.aborted = Some(reason);
    }

    fn finish(&mut self) {
        let Some(canary) = self.status.canary_version.take() else {
            return;
        };
        let previous = self.status.stable_version.replace(canary.clone());
        self.status.canary_weight = 0;
        self.status.current_step = Some(self.observed.rollout.spec.effective_steps().len() as u32);
        self.status.phase = Some(RolloutPhase::Healthy);
        self.status.pause_reason = None;
        self.event(
            false,
            "Promoted",
            format!(
                "{canary} is stable (was {})",
                previous.unwrap_or_else(|| "none".to_owned())
            ),
        );
    }

    fn pause(&mut self, reason: String) {
        if self.status.phase != Some(RolloutPhase::Paused) {
            self.event(false, "Paused", reason.clone());
        }
        self.status.phase = Some(RolloutPhase::Paused);
        self.status.pause_reason = Some(reason);
    }

    fn next_step(&mut self) {
        let steps = self.observed.rollout.spec.effective_steps();
        let next = self.status.current_step.unwrap_or(0) + 1;
        self.status.current_step = Some(next);
        self.status.step_started_at = Some(Time(self.observed.now));
        self.status.step_analysis_runs = 0;
        self.status.pause_reason = None;
        self.status.phase = Some(RolloutPhase::Progressing);
        if next as usize >= steps.len() {
            self.finish();
        }
    }

    fn record(&mut self, results: &[(String, Verdict)]) {
        let step = self.status.current_step.unwrap_or(0);
        for (metric, verdict) in results {
            self.status.measurements.push(Measurement {
                metric: metric.clone(),
                step,
                time: Time(self.observed.now),
                value: verdict.value,
                verdict: verdict.verdict,
                message: Some(verdict.message.clone()),
            });
        }
        let excess = self
            .status
            .measurements
            .len()
            .saturating_sub(MAX_MEASUREMENTS);
        self.status.measurements.drain(..excess);
        self.status.last_analysis_at = Some(Time(self.observed.now));
    }

    /// Judges one analysis round; returns whether it passed.
    fn judge_round(&mut self, results: &[(String, Verdict)]) -> bool {
        let Some(analysis) = &self.observed.rollout.spec.analysis else {
            return true;
        };
        self.record(results);
        let with = |verdict: MeasurementVerdict| {
            results
                .iter()
                .find(|(_, v)| v.verdict == verdict)
                .map(|(name, v)| format!("{name}: {}", v.message))
        };
        if let Some(failure) = with(MeasurementVerdict::Failed) {
            self.status.failed_measurements += 1;
            self.status.consecutive_errors = 0;
            if self.status.failed_measurements > analysis.failure_limit {
                self.abort(format!(
                    "analysis failed {} times (failureLimit {}): {failure}",
                    self.status.failed_measurements, analysis.failure_limit
                ));
            }
            return false;
        }
        if let Some(error) = with(MeasurementVerdict::Error) {
            self.status.consecutive_errors += 1;
            if self.status.consecutive_errors > analysis.consecutive_error_limit {
                let reason = format!(
                    "{} analysis errors in a row (consecutiveErrorLimit {}): {error}",
                    self.status.consecutive_errors, analysis.consecutive_error_limit
                );
                match analysis.on_error.unwrap_or_default() {
                    OnError::Abort => self.abort(reason),
                    OnError::Pause => self.pause(reason),
                }
            }
            return false;
        }
        self.status.consecutive_errors = 0;
        if let Some(inconclusive) = with(MeasurementVerdict::Inconclusive) {
            self.status.inconclusive_measurements += 1;
            if self.status.inconclusive_measurements > analysis.inconclusive_limit {
                self.pause(format!(
                    "analysis inconclusive {} times (inconclusiveLimit {}): {inconclusive}",
                    self.status.inconclusive_measurements, analysis.inconclusive_limit
                ));
            }
            return false;
        }
        true
    }

    fn canary_available(&self) -> bool {
        self.observed
            .canary_pods
            .as_ref()
            .is_some_and(VersionPods::all_available)
    }

    /// Holds the weight until every canary replica is available; aborts once the step's progress deadline
    /// passed, naming the pods and their state.
    fn wait_for_canary(&mut self) {
        let canary = self.status.canary_version.clone().unwrap_or_default();
        let state = self.observed.canary_pods.as_ref().map_or_else(
            || "its Deployment does not exist yet".to_owned(),
            VersionPods::describe,
        );
        let deadline = self
            .observed
            .rollout
            .spec
            .strategy
            .canary
            .progress_deadline();
        if elapsed_since(self.status.step_started_at.as_ref(), self.observed.now)
            >= duration(&deadline)
        {
            self.abort(format!(
                "{canary} did not become available within the progress deadline ({deadline}): {state}"
            ));
        } else {
            self.status.waiting_for = Some(format!("{canary} to be available: {state}"));
        }
    }

    /// Advances the current step as far as it can go now.
    fn progress(&mut self) {
        let rollout = self.observed.rollout;
        let steps = rollout.spec.effective_steps();
        let index = self.status.current_step.unwrap_or(0) as usize;
        let Some(step) = steps.get(index) else {
            self.finish();
            return;
        };
        let halted = halted(rollout, &self.status);
        match step {
            CanaryStep::SetWeight(weight) => {
                if *weight > self.status.canary_weight && !self.canary_available() {
                    self.wait_for_canary();
                    return;
                }
                self.status.canary_weight = *weight;
                let needed = rollout.spec.analysis.as_ref().map_or(0, |a| a.count);
                if !halted && self.status.step_analysis_runs >= needed {
                    self.next_step();
                }
            }
            CanaryStep::Pause(pause) => match &pause.duration {
                Some(length) if !halted => {
                    if elapsed_since(self.status.step_started_at.as_ref(), self.observed.now)
                        >= duration(length)
                    {
                        self.next_step();
                    }
                }
                Some(_) => {}
                None => self.pause(format!(
                    "step {index} waits to be promoted (kubectl annotate rollout {} {ACTION_ANNOTATION}=promote --overwrite)",
                    rollout.metadata.name.as_deref().unwrap_or_default()
                )),
            },
        }
    }
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

fn target_verdict(observed: &Observed<'_>) -> Result<(), String> {
    let name = &observed.rollout.spec.model_version;
    match observed.target {
        None => Err(format!("ModelVersion {name} does not exist")),
        Some(version) => match version.status.as_ref().and_then(|s| s.phase) {
            Some(ModelVersionPhase::Validated) => Ok(()),
            Some(ModelVersionPhase::Rejected) => Err(format!(
                "ModelVersion {name} is Rejected by its validation gates; only Validated versions roll out"
            )),
            _ => Err(format!("ModelVersion {name} is not Validated yet")),
        },
    }
}

fn decide(b: &mut Builder<'_>) {
    // Set again below when the canary still waits for its pods.
    b.status.waiting_for = None;
    let observed = b.observed;
    let rollout = observed.rollout;
    let target = rollout.spec.model_version.as_str();
    let action = pending_action(rollout);
    if let Some((value, _)) = &action {
        b.status.last_action = Some(value.clone());
    }
    let action = action.map(|(_, action)| action);
    let Some(stable) = b.status.stable_version.clone() else {
        // The first version is served directly: there is nothing to compare a canary with.
        match target_verdict(observed) {
            Ok(()) => {
                b.status.stable_version = Some(target.to_owned());
                b.status.phase = Some(RolloutPhase::Healthy);
                b.status.pause_reason = None;
                b.event(false, "Serving", format!("serving {target}"));
            }
            Err(reason) => b.status.pause_reason = Some(reason),
        }
        return;
    };
    if target == stable {
        if let Some(canary) = b.status.canary_version.take() {
            b.status.canary_weight = 0;
            b.status.pause_reason = None;
            b.event(
                false,
                "Reverted",
                format!("spec.modelVersion is back to {stable}; {canary} removed"),
            );
        }
        b.status.phase = Some(RolloutPhase::Healthy);
        b.status.abort_reason = None;
        return;
    }
    let in_flight = b.status.canary_version.as_deref() == Some(target);
    if !in_flight {
        match target_verdict(observed) {
            Ok(()) => b.start_progression(target),
            Err(reason) => {
                // Nothing changes for users: the stable version keeps all traffic.
                b.status.canary_version = None;
                b.status.canary_weight = 0;
                b.status.phase = Some(RolloutPhase::Healthy);
                b.status.pause_reason = Some(reason);
                return;
            }
        }
    }
    if b.status.phase == Some(RolloutPhase::Degraded) {
        if action == Some(Action::Retry) {
            b.start_progression(target);
        } else {
            return;
        }
    }
    if let Some(alert) = observed
        .firing
        .iter()
        .find(|alert| rollout.spec.alerts.contains(alert))
    {
        b.abort(format!("alert {alert} is firing"));
        return;
    }
    match action {
        Some(Action::Abort) => {
            b.abort("aborted by hand".to_owned());
            return;
        }
        Some(Action::PromoteFull) => {
            b.finish();
            return;
        }
        Some(Action::Promote) => {
            // A human decided: a halted analysis starts counting afresh.
            b.status.inconclusive_measurements = 0;
            b.status.consecutive_errors = 0;
            b.event(
                false,
                "Promoted",
                format!(
                    "step {} skipped by hand",
                    b.status.current_step.unwrap_or(0)
                ),
            );
            b.next_step();
            if b.status.canary_version.is_none() {
                return;
            }
        }
        Some(Action::Retry) | None => {}
    }
    if let Some(results) = &observed.analysis {
        let passed = b.judge_round(results);
        if b.aborted.is_some() {
            return;
        }
        if passed {
            b.status.step_analysis_runs += 1;
        }
    }
    if b.status.phase == Some(RolloutPhase::Paused)
        && b.status.pause_reason.is_some()
        && halted(rollout, &b.status)
    {
        return;
    }
    b.progress();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::examples::load;
    use flywheel_crds::modelversion::ModelVersionStatus;
    use flywheel_crds::rollout::{Analysis, AnalysisMetric, BuiltinMetric};

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap_or(Timestamp::UNIX_EPOCH)
    }

    fn version(name: &str, phase: ModelVersionPhase) -> ModelVersion {
        let mut version: ModelVersion = load("modelversion.yaml", 1);
        version.metadata.name = Some(name.into());
        version.status = Some(ModelVersionStatus {
            phase: Some(phase),
            ..ModelVersionStatus::default()
        });
        version
    }

    /// A rollout of `target` over a stable `ctr-v1`, default steps, analysis every 10 s, 2 rounds per step.
    fn rollout(target: &str) -> Rollout {
        let mut rollout: Rollout = load("rollout.yaml", 1);
        rollout.spec.model_version = target.into();
        rollout.spec.strategy.canary.steps.clear();
        rollout.spec.analysis = Some(Analysis {
            prometheus: "http://prometheus:9090".into(),
            prometheus_secret: None,
            tenant: None,
            interval: "10s".into(),
            initial_delay: None,
            count: 2,
            min_samples: 100,
            failure_limit: 0,
            inconclusive_limit: 1,
            consecutive_error_limit: 2,
            on_error: None,
            metrics: vec![AnalysisMetric {
                name: "auc-drop".into(),
                builtin: Some(BuiltinMetric::AucDrop),
                query: None,
                min: None,
                max: Some(0.005),
            }],
        });
        rollout.status = Some(RolloutStatus {
            stable_version: Some("ctr-v1".into()),
            phase: Some(RolloutPhase::Healthy),
            ..RolloutStatus::default()
        });
        rollout
    }

    fn round(verdict: MeasurementVerdict, value: f64) -> Option<Vec<(String, Verdict)>> {
        Some(vec![(
            "auc-drop".into(),
            Verdict {
                value: Some(value),
                verdict,
                message: format!("auc-drop = {value}"),
            },
        )])
    }

    /// Plans once and stores the status back, like the controller does; the canary's pods are available.
    fn step(
        rollout: &mut Rollout,
        target: &ModelVersion,
        analysis: Option<Vec<(String, Verdict)>>,
        firing: &[&str],
        now: Timestamp,
    ) -> RolloutPlan {
        let available = VersionPods {
            desired: 1,
            available: 1,
            problems: Vec::new(),
        };
        step_with(rollout, target, analysis, firing, Some(available), now)
    }

    fn step_with(
        rollout: &mut Rollout,
        target: &ModelVersion,
        analysis: Option<Vec<(String, Verdict)>>,
        firing: &[&str],
        canary_pods: Option<VersionPods>,
        now: Timestamp,
    ) -> RolloutPlan {
        let planned = plan(&Observed {
            rollout,
            target: Some(target),
            analysis,
            firing: firing.iter().map(|s| s.to_string()).collect(),
            online: OnlineView::NotNamed,
            drifted_routers: Vec::new(),
            canary_pods,
            stable_pods: Some(VersionPods {
                desired: 1,
                available: 1,
                problems: Vec::new(),
            }),
            versions: &[],
            owned: &[],
            serving: &serving(),
            credentials_digest: "d",
            now,
        })
        .unwrap_or_else(|err| panic!("the children serialize: {err}"));
        rollout.status = Some(planned.plan.status.clone());
        planned
    }

    fn serving() -> ServingSettings {
        ServingSettings {
            image: "flywheel-serving:test".into(),
            storage_claim: None,
            storage_path: "/var/lib/flywheel".into(),
        }
    }

    fn status(rollout: &Rollout) -> RolloutStatus {
        rollout.status.clone().unwrap_or_default()
    }

    #[test]
    fn a_drifted_router_is_reported_and_restored_without_touching_the_state() {
        let rollout = rollout("ctr-v1");
        let target = version("ctr-v1", ModelVersionPhase::Validated);
        let observe = |drifted: Vec<String>| {
            plan(&Observed {
                rollout: &rollout,
                target: Some(&target),
                analysis: None,
                firing: Vec::new(),
                online: OnlineView::NotNamed,
                drifted_routers: drifted,
                canary_pods: None,
                stable_pods: None,
                versions: &[],
                owned: &[],
                serving: &serving(),
                credentials_digest: "d",
                now: at(0),
            })
            .unwrap_or_else(|err| panic!("the children serialize: {err}"))
        };
        let steady = observe(Vec::new());
        assert!(steady.push_routes.is_none());
        assert!(
            steady
                .plan
                .events
                .iter()
                .all(|e| e.reason != "RoutesDrifted")
        );
        let drifted = observe(vec!["ctr-router-7d9f".into()]);
        assert!(drifted.push_routes.is_some());
        assert_eq!(drifted.plan.status, steady.plan.status);
        let event = drifted
            .plan
            .events
            .iter()
            .find(|e| e.reason == "RoutesDrifted")
            .map(|e| (e.warning, e.note.clone()));
        assert!(
            matches!(&event, Some((true, note)) if note.contains("ctr-router-7d9f")),
            "{event:?}"
        );
    }

    #[test]
    fn ready_means_the_stable_version_serves_from_every_replica() {
        let rollout = rollout("ctr-v1");
        let target = version("ctr-v1", ModelVersionPhase::Validated);
        let ready_with = |stable_pods: Option<VersionPods>| {
            let planned = plan(&Observed {
                rollout: &rollout,
                target: Some(&target),
                analysis: None,
                firing: Vec::new(),
                online: OnlineView::NotNamed,
                drifted_routers: Vec::new(),
                canary_pods: None,
                stable_pods,
                versions: &[],
                owned: &[],
                serving: &serving(),
                credentials_digest: "d",
                now: at(0),
            })
            .unwrap_or_else(|err| panic!("the children serialize: {err}"));
            let ready = planned
                .plan
                .status
                .conditions
                .iter()
                .find(|c| c.type_ == "Ready")
                .map(|c| (c.status.clone(), c.message.clone()));
            (ready, planned.plan.requeue)
        };
        let (ready, requeue) = ready_with(None);
        assert_eq!(
            ready,
            Some((
                "False".to_owned(),
                "ctr-v1: its Deployment does not exist yet".to_owned()
            ))
        );
        assert_eq!(requeue, Some(WAIT_REQUEUE));
        let crashing = VersionPods {
            desired: 2,
            available: 1,
            problems: vec!["ctr-ctr-v1-abc: CrashLoopBackOff after 3 restarts".into()],
        };
        let (ready, _) = ready_with(Some(crashing));
        assert!(
            ready
                .as_ref()
                .is_some_and(|(status, message)| status == "False"
                    && message.contains("1/2 pods available; ctr-ctr-v1-abc: CrashLoopBackOff")),
            "{ready:?}"
        );
        let serving = VersionPods {
            desired: 2,
            available: 2,
            problems: Vec::new(),
        };
        let (ready, _) = ready_with(Some(serving));
        assert_eq!(
            ready,
            Some(("True".to_owned(), "serving ctr-v1".to_owned()))
        );
    }

    #[test]
    fn the_first_validated_version_is_served_directly() {
        let mut rollout = rollout("ctr-v1");
        rollout.status = None;
        let target = version("ctr-v1", ModelVersionPhase::Validated);
        step(&mut rollout, &target, None, &[], at(0));
        let s = status(&rollout);
        assert_eq!(
            (s.stable_version.as_deref(), s.phase),
            (Some("ctr-v1"), Some(RolloutPhase::Healthy))
        );
    }

    #[test]
    fn a_good_canary_walks_every_step_and_becomes_stable() {
        let mut rollout = rollout("ctr-v2");
        let target = version("ctr-v2", ModelVersionPhase::Validated);
        step(&mut rollout, &target, None, &[], at(0));
        let mut weights = vec![status(&rollout).canary_weight];
        assert_eq!(status(&rollout).phase, Some(RolloutPhase::Progressing));
        let mut now = 0;
        while status(&rollout).canary_version.is_some() {
            now += 10;
            assert!(analysis_due(&rollout, at(now)), "analysis due at {now}");
            step(
                &mut rollout,
                &target,
                round(MeasurementVerdict::Successful, 0.001),
                &[],
                at(now),
            );
            weights.push(status(&rollout).canary_weight);
            assert!(now < 200, "never finished: {:?}", status(&rollout));
        }
        weights.dedup();
        assert_eq!(weights, vec![1, 5, 20, 100, 0]);
        let s = status(&rollout);
        assert_eq!(
            (s.stable_version.as_deref(), s.phase),
            (Some("ctr-v2"), Some(RolloutPhase::Healthy))
        );
        assert_eq!(s.measurements.len(), 8, "2 rounds x 4 steps");
    }

    #[test]
    fn a_failing_round_aborts_at_once_and_stays_degraded() {
        let mut rollout = rollout("ctr-v2");
        let target = version("ctr-v2", ModelVersionPhase::Validated);
        step(&mut rollout, &target, None, &[], at(0));
        let planned = step(
            &mut rollout,
            &target,
            round(MeasurementVerdict::Failed, 0.02),
            &[],
            at(10),
        );
        assert!(planned.aborted.is_some());
        let s = status(&rollout);
        assert_eq!(
            (s.phase, s.canary_weight),
            (Some(RolloutPhase::Degraded), 0)
        );
        assert!(
            s.abort_reason
                .as_deref()
                .unwrap_or_default()
                .contains("auc-drop = 0.02")
        );
        assert!(
            planned
                .plan
                .events
                .iter()
                .any(|e| e.reason == "Aborted" && e.warning)
        );
        assert!(!analysis_due(&rollout, at(100)));
        step(&mut rollout, &target, None, &[], at(20));
        assert_eq!(
            status(&rollout).phase,
            Some(RolloutPhase::Degraded),
            "no new progression of the same version"
        );
        rollout.metadata.annotations =
            Some([(ACTION_ANNOTATION.to_owned(), "retry".to_owned())].into());
        step(&mut rollout, &target, None, &[], at(30));
        let s = status(&rollout);
        assert_eq!(
            (s.phase, s.canary_weight, s.failed_measurements),
            (Some(RolloutPhase::Progressing), 1, 0)
        );
    }

    #[test]
    fn too_few_samples_pause_and_never_roll_back() {
        let mut rollout = rollout("ctr-v2");
        let target = version("ctr-v2", ModelVersionPhase::Validated);
        step(&mut rollout, &target, None, &[], at(0));
        step(
            &mut rollout,
            &target,
            round(MeasurementVerdict::Inconclusive, 0.0),
            &[],
            at(10),
        );
        assert_eq!(status(&rollout).phase, Some(RolloutPhase::Progressing));
        let planned = step(
            &mut rollout,
            &target,
            round(MeasurementVerdict::Inconclusive, 0.0),
            &[],
            at(20),
        );
        assert!(planned.aborted.is_none());
        let s = status(&rollout);
        assert_eq!((s.phase, s.canary_weight), (Some(RolloutPhase::Paused), 1));
        assert!(
            s.pause_reason
                .as_deref()
                .unwrap_or_default()
                .contains("inconclusive 2 times")
        );
        assert!(
            !analysis_due(&rollout, at(100)),
            "a halted analysis waits for a human"
        );
    }

    #[test]
    fn analysis_errors_beyond_the_limit_abort_unless_on_error_says_pause() {
        for (on_error, phase) in [
            (None, RolloutPhase::Degraded),
            (Some(OnError::Abort), RolloutPhase::Degraded),
            (Some(OnError::Pause), RolloutPhase::Paused),
        ] {
            let mut rollout = rollout("ctr-v2");
            if let Some(analysis) = rollout.spec.analysis.as_mut() {
                analysis.on_error = on_error;
            }
            let target = version("ctr-v2", ModelVersionPhase::Validated);
            step(&mut rollout, &target, None, &[], at(0));
            let mut last = None;
            for round_index in 1..=3 {
                last = Some(step(
                    &mut rollout,
                    &target,
                    round(MeasurementVerdict::Error, f64::NAN),
                    &[],
                    at(10 * round_index),
                ));
            }
            let s = status(&rollout);
            assert_eq!(s.phase, Some(phase), "onError {on_error:?}");
            let expected_weight = if phase == RolloutPhase::Degraded {
                0
            } else {
                1
            };
            assert_eq!(s.canary_weight, expected_weight);
            assert_eq!(
                last.and_then(|p| p.aborted).is_some(),
                phase == RolloutPhase::Degraded
            );
        }
    }

    #[test]
    fn the_weight_moves_only_when_every_canary_pod_is_available() {
        let mut rollout = rollout("ctr-v2");
        let target = version("ctr-v2", ModelVersionPhase::Validated);
        let starting = VersionPods {
            desired: 2,
            available: 1,
            problems: vec!["ctr-ctr-v2-abc: ContainerCreating after 0 restarts".into()],
        };
        let planned = step_with(&mut rollout, &target, None, &[], None, at(0));
        assert_eq!(planned.plan.requeue, Some(WAIT_REQUEUE));
        step_with(&mut rollout, &target, None, &[], Some(starting), at(5));
        let s = status(&rollout);
        assert_eq!(
            (s.phase, s.canary_weight),
            (Some(RolloutPhase::Progressing), 0)
        );
        assert!(
            s.waiting_for
                .as_deref()
                .is_some_and(|w| w.contains("1/2 pods available; ctr-ctr-v2-abc")),
            "{:?}",
            s.waiting_for
        );
        let ready = VersionPods {
            desired: 2,
            available: 2,
            problems: Vec::new(),
        };
        step_with(&mut rollout, &target, None, &[], Some(ready), at(6));
        let s = status(&rollout);
        assert_eq!((s.canary_weight, s.waiting_for), (1, None));
    }

    #[test]
    fn a_canary_that_never_becomes_available_is_aborted_at_its_progress_deadline() {
        let mut rollout = rollout("ctr-v2");
        rollout.spec.strategy.canary.progress_deadline = Some("2m".into());
        let target = version("ctr-v2", ModelVersionPhase::Validated);
        let crashing = || VersionPods {
            desired: 1,
            available: 0,
            problems: vec!["ctr-ctr-v2-abc: CrashLoopBackOff after 5 restarts".into()],
        };
        step_with(&mut rollout, &target, None, &[], Some(crashing()), at(0));
        let planned = step_with(&mut rollout, &target, None, &[], Some(crashing()), at(119));
        assert!(planned.aborted.is_none());
        let planned = step_with(&mut rollout, &target, None, &[], Some(crashing()), at(120));
        let s = status(&rollout);
        assert_eq!(
            (s.phase, s.canary_weight),
            (Some(RolloutPhase::Degraded), 0)
        );
        assert_eq!(
            planned.aborted.as_deref(),
            Some(
                "ctr-v2 did not become available within the progress deadline (2m): 0/1 pods available; \
                 ctr-ctr-v2-abc: CrashLoopBackOff after 5 restarts"
            )
        );
    }

    #[test]
    fn a_firing_alert_aborts_without_waiting_for_analysis() {
        let mut rollout = rollout("ctr-v2");
        let target = version("ctr-v2", ModelVersionPhase::Validated);
        step(&mut rollout, &target, None, &[], at(0));
        step(&mut rollout, &target, None, &["SomethingElse"], at(1));
        assert_eq!(
            status(&rollout).phase,
            Some(RolloutPhase::Progressing),
            "only configured alerts count"
        );
        let planned = step(
            &mut rollout,
            &target,
            None,
            &["FlywheelCalibrationDeviation"],
            at(2),
        );
        assert_eq!(
            planned.aborted.as_deref(),
            Some("alert FlywheelCalibrationDeviation is firing")
        );
        assert_eq!(status(&rollout).canary_weight, 0);
    }

    #[test]
    fn only_validated_versions_start_a_progression() {
        let mut rollout = rollout("ctr-v2");
        let target = version("ctr-v2", ModelVersionPhase::Rejected);
        step(&mut rollout, &target, None, &[], at(0));
        let s = status(&rollout);
        assert_eq!(
            (s.canary_version, s.phase),
            (None, Some(RolloutPhase::Healthy))
        );
        assert!(
            s.pause_reason
                .as_deref()
                .unwrap_or_default()
                .contains("Rejected")
        );
    }

    #[test]
    fn a_pause_without_duration_waits_for_promote() {
        let mut rollout = rollout("ctr-v2");
        rollout.spec.analysis = None;
        rollout.spec.strategy.canary.steps = vec![
            CanaryStep::SetWeight(10),
            CanaryStep::Pause(flywheel_crds::rollout::Pause { duration: None }),
            CanaryStep::SetWeight(100),
        ];
        let target = version("ctr-v2", ModelVersionPhase::Validated);
        step(&mut rollout, &target, None, &[], at(0));
        step(&mut rollout, &target, None, &[], at(5));
        let s = status(&rollout);
        assert_eq!((s.phase, s.canary_weight), (Some(RolloutPhase::Paused), 10));
        rollout.metadata.annotations =
            Some([(ACTION_ANNOTATION.to_owned(), "promote".to_owned())].into());
        step(&mut rollout, &target, None, &[], at(6));
        let s = status(&rollout);
        assert_eq!(
            (s.stable_version.as_deref(), s.phase),
            (Some("ctr-v2"), Some(RolloutPhase::Healthy))
        );
        assert_eq!(s.last_action.as_deref(), Some("promote"));
    }
}
