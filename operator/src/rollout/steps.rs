//! The Rollout state machine's steps: start a progression, move the weight when the canary's pods are
//! available, judge analysis rounds, pause, abort, promote. Pure: it changes a status being built.

use flywheel_crds::modelversion::ModelVersionPhase;
use flywheel_crds::rollout::{
    CanaryStep, Measurement, MeasurementVerdict, OnError, RolloutPhase, RolloutStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::health::VersionPods;
use crate::plan::PlannedEvent;
use crate::rollout::analysis::Verdict;

use super::observed::{
    ACTION_ANNOTATION, Action, Observed, duration, elapsed_since, halted, pending_action,
};

/// Measurements kept in status (the oldest go first).
pub const MAX_MEASUREMENTS: usize = 100;

pub(super) struct Builder<'a> {
    pub(super) observed: &'a Observed<'a>,
    pub(super) status: RolloutStatus,
    pub(super) events: Vec<PlannedEvent>,
    pub(super) aborted: Option<String>,
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

pub(super) fn target_verdict(observed: &Observed<'_>) -> Result<(), String> {
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

pub(super) fn decide(b: &mut Builder<'_>) {
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
