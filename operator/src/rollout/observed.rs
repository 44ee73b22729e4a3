//! What a Rollout reconcile observed, and how the plan reads it: the manual action asked for, the clock against
//! the status's timestamps, and whether an analysis round is due.

use std::time::Duration;

use flywheel_crds::rollout::{RolloutPhase, RolloutStatus};
use flywheel_crds::{ModelVersion, Rollout};
use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::health::VersionPods;
use super::online::OnlineView;
use crate::config::ServingSettings;
use crate::plan::OwnedObject;
use crate::rollout::analysis::Verdict;

/// Annotation carrying a manual action: `promote`, `promote-full`, `abort` or `retry`, optionally followed by
/// `:<anything>` so the same action can be given again.
pub const ACTION_ANNOTATION: &str = "flywheel.dev/action";

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
    /// The traffic log sink's pods (`None` when the Rollout logs no traffic).
    pub traffic_log_pods: Option<VersionPods>,
    /// The ModelVersions the rollout may serve (stable, canary, target) that exist.
    pub versions: &'a [&'a ModelVersion],
    /// The Deployments and Services labelled with this rollout, from the cache (swept when not planned).
    pub owned: &'a [OwnedObject],
    pub serving: &'a ServingSettings,
    /// Digest of the rollout's credentials, stamped on its pod templates.
    pub credentials_digest: &'a str,
    pub now: Timestamp,
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

pub(super) fn duration(text: &flywheel_crds::common::Duration) -> Duration {
    text.parse().unwrap_or(Duration::ZERO)
}

pub(super) fn elapsed_since(since: Option<&Time>, now: Timestamp) -> Duration {
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
pub(super) fn halted(rollout: &Rollout, status: &RolloutStatus) -> bool {
    rollout.spec.analysis.as_ref().is_some_and(|analysis| {
        status.inconclusive_measurements > analysis.inconclusive_limit
            || status.consecutive_errors > analysis.consecutive_error_limit
    })
}
