//! A ModelVersion's validation gates, evaluated against its offline metrics and, for relative gates, a baseline
//! version's. Pure: the baseline is resolved by the caller.

use flywheel_crds::modelversion::OfflineMetrics;
use flywheel_crds::modelversion::{Gate, GateMetric, GateResult, GateVerdict, ModelVersionPhase};

/// What a gate's baseline resolved to.
#[derive(Clone, Debug, PartialEq)]
pub enum ResolvedBaseline<'a> {
    /// The version to compare with (its name and metrics).
    Version(&'a str, &'a OfflineMetrics),
    /// The alias has no holder yet: there is nothing to compare with (the first version of a model).
    UnheldAlias(&'a str),
    /// The named ModelVersion does not exist (yet).
    Missing(&'a str),
}

pub fn metric_value(metrics: &OfflineMetrics, metric: GateMetric) -> Option<f64> {
    match metric {
        GateMetric::Auc => metrics.auc,
        GateMetric::Gauc => metrics.gauc,
        GateMetric::LogLoss => metrics.log_loss,
        GateMetric::Calibration => metrics.calibration,
    }
}

fn metric_name(metric: GateMetric) -> &'static str {
    match metric {
        GateMetric::Auc => "auc",
        GateMetric::Gauc => "gauc",
        GateMetric::LogLoss => "logLoss",
        GateMetric::Calibration => "calibration",
    }
}

/// The bounds a gate applies, and how they went.
struct Outcome {
    bounds: Vec<String>,
    verdict: GateVerdict,
    messages: Vec<String>,
}

impl Outcome {
    /// Records a bound; `holds` is `None` when it could not be checked.
    fn check(&mut self, holds: Option<bool>, bound: String) {
        self.bounds.push(bound);
        match holds {
            Some(true) => {}
            Some(false) => self.verdict = GateVerdict::Fail,
            None if self.verdict == GateVerdict::Pass => self.verdict = GateVerdict::Unknown,
            None => {}
        }
    }
}

/// Evaluates one gate; `baseline` is `None` for gates without one.
pub fn evaluate(
    gate: &Gate,
    metrics: &OfflineMetrics,
    baseline: Option<&ResolvedBaseline<'_>>,
) -> GateResult {
    let value = metric_value(metrics, gate.metric);
    let mut outcome = Outcome {
        bounds: Vec::new(),
        verdict: GateVerdict::Pass,
        messages: Vec::new(),
    };
    if let Some(min) = gate.min {
        outcome.check(value.map(|v| v >= min), format!(">= {min}"));
    }
    if let Some(max) = gate.max {
        outcome.check(value.map(|v| v <= max), format!("<= {max}"));
    }
    let relative = [
        (gate.max_decrease, -1.0, ">=", "-"),
        (gate.max_increase, 1.0, "<=", "+"),
    ];
    for (allowance, direction, operator, sign) in relative {
        let Some(allowance) = allowance else {
            continue;
        };
        match baseline {
            Some(ResolvedBaseline::Version(name, baseline_metrics)) => {
                match metric_value(baseline_metrics, gate.metric) {
                    Some(base) => {
                        let bound = base + direction * allowance;
                        let holds = value.map(|v| {
                            if direction < 0.0 {
                                v >= bound
                            } else {
                                v <= bound
                            }
                        });
                        outcome.check(
                            holds,
                            format!(
                                "{operator} {bound:.6} (baseline {name} {base} {sign} {allowance})"
                            ),
                        );
                    }
                    None => {
                        outcome.check(
                            None,
                            format!("{operator} baseline {name} {sign} {allowance}"),
                        );
                        outcome.messages.push(format!(
                            "baseline {name} has no {}",
                            metric_name(gate.metric)
                        ));
                    }
                }
            }
            Some(ResolvedBaseline::UnheldAlias(alias)) => {
                outcome
                    .bounds
                    .push(format!("{operator} holder of {alias} {sign} {allowance}"));
                outcome.messages.push(format!(
                    "no version holds alias {alias} yet: nothing to compare with"
                ));
            }
            Some(ResolvedBaseline::Missing(name)) => {
                outcome.check(
                    None,
                    format!("{operator} baseline {name} {sign} {allowance}"),
                );
                outcome
                    .messages
                    .push(format!("baseline ModelVersion {name} not found"));
            }
            None => {
                outcome.check(None, format!("{operator} baseline {sign} {allowance}"));
                outcome
                    .messages
                    .push("the gate names no baseline".to_owned());
            }
        }
    }
    if value.is_none() {
        outcome.messages.push(format!(
            "the version has no offline {}",
            metric_name(gate.metric)
        ));
        outcome.verdict = GateVerdict::Unknown;
    }
    GateResult {
        metric: gate.metric,
        value,
        threshold: outcome.bounds.join(" and "),
        verdict: outcome.verdict,
        message: (!outcome.messages.is_empty()).then(|| outcome.messages.join("; ")),
    }
}

/// The phase the gate results give: any failure rejects, any unknown waits, otherwise validated.
pub fn phase_of(results: &[GateResult]) -> ModelVersionPhase {
    if results.iter().any(|r| r.verdict == GateVerdict::Fail) {
        ModelVersionPhase::Rejected
    } else if results.iter().any(|r| r.verdict == GateVerdict::Unknown) {
        ModelVersionPhase::Pending
    } else {
        ModelVersionPhase::Validated
    }
}

/// One line naming each gate that did not pass, for conditions and events.
pub fn summary(results: &[GateResult]) -> String {
    let failing: Vec<String> = results
        .iter()
        .filter(|r| r.verdict != GateVerdict::Pass)
        .map(|r| {
            let value = r.value.map_or("none".to_owned(), |v| format!("{v}"));
            let verdict = if r.verdict == GateVerdict::Fail {
                "failed"
            } else {
                "unknown"
            };
            let message = r
                .message
                .as_ref()
                .map(|m| format!(" ({m})"))
                .unwrap_or_default();
            format!(
                "{} {value} {verdict} {}{message}",
                metric_name(r.metric),
                r.threshold
            )
        })
        .collect();
    if failing.is_empty() {
        format!("all {} gates passed", results.len())
    } else {
        failing.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flywheel_crds::modelversion::Baseline;

    fn metrics(auc: f64) -> OfflineMetrics {
        OfflineMetrics {
            auc: Some(auc),
            calibration: Some(1.02),
            ..OfflineMetrics::default()
        }
    }

    fn gate(metric: GateMetric) -> Gate {
        Gate {
            metric,
            min: None,
            max: None,
            baseline: None,
            max_decrease: None,
            max_increase: None,
        }
    }

    #[test]
    fn absolute_bounds_pass_or_fail_with_the_threshold_written_out() {
        let mut auc = gate(GateMetric::Auc);
        auc.min = Some(0.75);
        let pass = evaluate(&auc, &metrics(0.78), None);
        assert_eq!(
            (pass.verdict, pass.threshold.as_str()),
            (GateVerdict::Pass, ">= 0.75")
        );
        let fail = evaluate(&auc, &metrics(0.70), None);
        assert_eq!(fail.verdict, GateVerdict::Fail);
        let mut calibration = gate(GateMetric::Calibration);
        calibration.min = Some(0.9);
        calibration.max = Some(1.1);
        let result = evaluate(&calibration, &metrics(0.7), None);
        assert_eq!(
            (result.verdict, result.threshold.as_str()),
            (GateVerdict::Pass, ">= 0.9 and <= 1.1")
        );
        let missing = evaluate(&gate_with_min(GateMetric::Gauc, 0.7), &metrics(0.8), None);
        assert_eq!(missing.verdict, GateVerdict::Unknown);
        assert_eq!(
            phase_of(&[pass.clone(), missing]),
            ModelVersionPhase::Pending
        );
        assert_eq!(phase_of(&[pass, fail]), ModelVersionPhase::Rejected);
    }

    fn gate_with_min(metric: GateMetric, min: f64) -> Gate {
        let mut gate = gate(metric);
        gate.min = Some(min);
        gate
    }

    #[test]
    fn relative_gates_compare_with_the_baseline() {
        let mut auc = gate(GateMetric::Auc);
        auc.baseline = Some(Baseline::Alias("production".into()));
        auc.max_decrease = Some(0.002);
        let production = metrics(0.783);
        let baseline = ResolvedBaseline::Version("ctr-v3", &production);
        let slightly_worse = evaluate(&auc, &metrics(0.7815), Some(&baseline));
        assert_eq!(slightly_worse.verdict, GateVerdict::Pass);
        assert_eq!(
            slightly_worse.threshold,
            ">= 0.781000 (baseline ctr-v3 0.783 - 0.002)"
        );
        let worse = evaluate(&auc, &metrics(0.7805), Some(&baseline));
        assert_eq!(worse.verdict, GateVerdict::Fail);
        assert!(summary(&[worse]).starts_with("auc 0.7805 failed >= 0.781000"));
        let first = evaluate(
            &auc,
            &metrics(0.6),
            Some(&ResolvedBaseline::UnheldAlias("production")),
        );
        assert_eq!(
            first.verdict,
            GateVerdict::Pass,
            "nothing to compare the first version with"
        );
        let missing = evaluate(
            &auc,
            &metrics(0.9),
            Some(&ResolvedBaseline::Missing("ctr-v9")),
        );
        assert_eq!(missing.verdict, GateVerdict::Unknown);
        assert!(
            missing
                .message
                .is_some_and(|m| m.contains("ctr-v9 not found"))
        );
    }
}
