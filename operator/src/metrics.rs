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

pub struct Metrics {
    pub registry: Registry,
    reconciliations: Family<KindLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: Family<KindLabels, Histogram>,
    invalid_specs: Family<SpecLabels, Counter>,
    leader: Gauge,
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
        Metrics {
            registry,
            reconciliations,
            errors,
            duration,
            invalid_specs,
            leader,
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
