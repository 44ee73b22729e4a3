//! The operator's Prometheus metrics (prometheus-client), served at /metrics.

use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: &'static str,
    pub error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SpecLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QuotaLabels {
    pub quota: String,
    pub resource: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutVersionLabels {
    pub namespace: String,
    pub rollout: String,
    pub version: String,
    pub role: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    reconciliations: Family<KindLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Family<KindLabels, Histogram>,
    invalid_specs: Family<SpecLabels, Counter>,
    leader: Gauge,
    jobs_by_phase: Family<PhaseLabels, Gauge>,
    admission_wait: Histogram,
    gang_restarts: Counter,
    rollout_aborts: Counter,
    rollout_versions: Family<RolloutVersionLabels, Gauge>,
    quota_used: Family<QuotaLabels, Gauge>,
    quota_limit: Family<QuotaLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("flywheel_operator");
        let reconciliations = Family::<KindLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let duration = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        let invalid_specs = Family::<SpecLabels, Counter>::default();
        let leader = Gauge::default();
        registry.register(
            "reconciliations",
            "Reconciliations run, by kind",
            reconciliations.clone(),
        );
        registry.register(
            "reconcile_errors",
            "Reconciliations that failed, by kind and error",
            errors.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconciliation took, by kind",
            duration.clone(),
        );
        registry.register(
            "invalid_spec_transitions",
            "Times an object entered the InvalidSpec condition, by kind",
            invalid_specs.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease",
            leader.clone(),
        );
        let jobs_by_phase = Family::<PhaseLabels, Gauge>::default();
        registry.register(
            "training_jobs",
            "TrainingJobs by phase",
            jobs_by_phase.clone(),
        );
        let admission_wait = Histogram::new(exponential_buckets(0.05, 2.0, 16));
        registry.register(
            "training_job_admission_wait_seconds",
            "Time from a TrainingJob's creation (or its return to the queue) to its admission",
            admission_wait.clone(),
        );
        let rollout_aborts = Counter::default();
        registry.register(
            "rollout_aborts",
            "Canaries aborted and rolled back (analysis failure, alert, or by hand)",
            rollout_aborts.clone(),
        );
        let rollout_versions = Family::<RolloutVersionLabels, Gauge>::default();
        registry.register(
            "rollout_version",
            "1 for each version a Rollout serves, by role (stable, canary): joins serving metrics to roles",
            rollout_versions.clone(),
        );
        let gang_restarts = Counter::default();
        registry.register(
            "training_job_gang_restarts",
            "Whole-gang restarts after a member failed",
            gang_restarts.clone(),
        );
        let quota_used = Family::<QuotaLabels, Gauge>::default();
        registry.register(
            "gpuquota_used",
            "GPUs held by admitted jobs, per quota and resource",
            quota_used.clone(),
        );
        let quota_limit = Family::<QuotaLabels, Gauge>::default();
        registry.register(
            "gpuquota_limit",
            "GPU limit per quota and resource",
            quota_limit.clone(),
        );
        Metrics {
            registry,
            reconciliations,
            errors,
            duration,
            invalid_specs,
            leader,
            jobs_by_phase,
            admission_wait,
            gang_restarts,
            rollout_aborts,
            rollout_versions,
            quota_used,
            quota_limit,
        }
    }

    /// Counts a reconciliation and times it until the returned guard drops.
    pub fn reconcile_started(&self, kind: &'static str) -> ReconcileTimer<'_> {
        self.reconciliations
            .get_or_create(&KindLabels { kind })
            .inc();
        ReconcileTimer {
            metrics: self,
            kind,
            start: Instant::now(),
        }
    }

    pub fn reconcile_failed(&self, kind: &'static str, error: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels { kind, error })
            .inc();
    }

    pub fn invalid_spec(&self, kind: &'static str) {
        self.invalid_specs.get_or_create(&SpecLabels { kind }).inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    pub fn set_jobs_by_phase(&self, counts: &std::collections::BTreeMap<&'static str, i64>) {
        for phase in [
            "Pending",
            "Queued",
            "Running",
            "Restarting",
            "Suspended",
            "Succeeded",
            "Failed",
        ] {
            self.jobs_by_phase
                .get_or_create(&PhaseLabels { phase })
                .set(counts.get(phase).copied().unwrap_or_default());
        }
    }

    pub fn job_admitted(&self, waited: std::time::Duration) {
        self.admission_wait.observe(waited.as_secs_f64());
    }

    /// Publishes which versions a Rollout serves in which role, replacing what it published before.
    pub fn set_rollout_versions(
        &self,
        namespace: &str,
        rollout: &str,
        before: [(Option<&str>, &'static str); 2],
        after: [(Option<&str>, &'static str); 2],
    ) {
        let labels = |version: &str, role| RolloutVersionLabels {
            namespace: namespace.to_owned(),
            rollout: rollout.to_owned(),
            version: version.to_owned(),
            role,
        };
        for (version, role) in before {
            if let Some(version) = version {
                self.rollout_versions.remove(&labels(version, role));
            }
        }
        for (version, role) in after {
            if let Some(version) = version {
                self.rollout_versions
                    .get_or_create(&labels(version, role))
                    .set(1);
            }
        }
    }

    pub fn rollout_aborted(&self) {
        self.rollout_aborts.inc();
    }

    pub fn gang_restarted(&self) {
        self.gang_restarts.inc();
    }

    pub fn set_quota_usage(&self, quota: &str, resource: &str, used: u32, limit: u32) {
        let labels = QuotaLabels {
            quota: quota.to_owned(),
            resource: resource.to_owned(),
        };
        self.quota_used.get_or_create(&labels).set(i64::from(used));
        self.quota_limit
            .get_or_create(&labels)
            .set(i64::from(limit));
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}

pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    kind: &'static str,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .get_or_create(&KindLabels { kind: self.kind })
            .observe(self.start.elapsed().as_secs_f64());
    }
}
