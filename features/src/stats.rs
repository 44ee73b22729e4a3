//! Per-feature statistics (status, and the drift baseline) and drift of new data against that baseline: PSI and
//! KS for numeric features (the ML core's definitions, equal to numpy/scipy), PSI over category shares for
//! strings.

use std::borrow::{Borrow, Cow};
use std::collections::HashMap;

use flywheel_crds::featureview::{FeatureDrift, FeatureStatistics};
use flywheel_ml::metrics::{PSI_EMPTY_BIN_SHARE, ks, psi, quantile_sorted};
use serde::{Deserialize, Serialize};

use crate::value::FeatureValue;

/// Order statistics a numeric baseline keeps: enough for PSI's deciles and a KS accurate to 1e-4.
pub const BASELINE_SAMPLE: usize = 10_000;
/// Categories a string baseline keeps by share; the rest pool into one "other" bin.
pub const BASELINE_CATEGORIES: usize = 32;
/// Bins of numeric PSI.
pub const PSI_BINS: usize = 10;

/// The statistics (count, missing rate, and for numbers mean, standard deviation (population) and deciles
/// p0…p100) and the drift baseline of one feature's values, at once: its numbers are sorted once.
pub fn profile<V: Borrow<FeatureValue>>(
    name: &str,
    values: &[V],
) -> (FeatureStatistics, Option<Baseline>) {
    let numbers = sorted_numbers(values);
    let statistics = statistics_of_sorted(name, values, &numbers);
    (statistics, Baseline::of_sorted(values, numbers))
}

/// The numeric values, in ascending order.
fn sorted_numbers<V: Borrow<FeatureValue>>(values: &[V]) -> Vec<f64> {
    let mut numbers: Vec<f64> = values.iter().filter_map(|v| v.borrow().as_f64()).collect();
    numbers.sort_unstable_by(f64::total_cmp);
    numbers
}

fn statistics_of_sorted<V: Borrow<FeatureValue>>(
    name: &str,
    values: &[V],
    numbers: &[f64],
) -> FeatureStatistics {
    let present = values
        .iter()
        .filter(|v| !Borrow::<FeatureValue>::borrow(*v).is_null())
        .count();
    let missing_rate = if values.is_empty() {
        0.0
    } else {
        (values.len() - present) as f64 / values.len() as f64
    };
    let (mut mean, mut std, mut quantiles) = (None, None, Vec::new());
    if !numbers.is_empty() {
        let n = numbers.len() as f64;
        let m = numbers.iter().sum::<f64>() / n;
        mean = Some(m);
        std = Some((numbers.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n).sqrt());
        quantiles = (0..=10)
            .map(|i| quantile_sorted(numbers, i as f64 / 10.0))
            .collect();
    }
    FeatureStatistics {
        name: name.to_owned(),
        count: present as i64,
        missing_rate,
        mean,
        std,
        quantiles,
    }
}

/// The reference distribution of one feature.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub enum Baseline {
    /// Evenly spaced order statistics of the baseline values (all of them when there are few).
    Numeric { sample: Vec<f64> },
    /// Shares of the most frequent categories, and of the rest under `other`.
    Categorical {
        shares: Vec<(String, f64)>,
        other: f64,
    },
}

impl Baseline {
    /// The baseline of `values`, whose numbers (sorted) are `numbers`; `None` when no value is present.
    fn of_sorted<V: Borrow<FeatureValue>>(values: &[V], numbers: Vec<f64>) -> Option<Baseline> {
        let present: Vec<&FeatureValue> = values
            .iter()
            .map(Borrow::borrow)
            .filter(|v| !v.is_null())
            .collect();
        if present.is_empty() {
            return None;
        }
        if present.iter().all(|v| matches!(v, FeatureValue::Str(_))) {
            let shares = category_shares(&present);
            let mut ranked: Vec<(String, f64)> = shares.into_iter().collect();
            ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            let other = ranked
                .iter()
                .skip(BASELINE_CATEGORIES)
                .map(|(_, s)| s)
                .sum();
            ranked.truncate(BASELINE_CATEGORIES);
            return Some(Baseline::Categorical {
                shares: ranked,
                other,
            });
        }
        let sample = if numbers.len() <= BASELINE_SAMPLE {
            numbers
        } else {
            (0..BASELINE_SAMPLE)
                .map(|i| quantile_sorted(&numbers, i as f64 / (BASELINE_SAMPLE - 1) as f64))
                .collect()
        };
        Some(Baseline::Numeric { sample })
    }

    /// PSI (and KS for numbers) of `values` against this baseline; `None` when no value is present.
    pub fn drift<V: Borrow<FeatureValue>>(&self, values: &[V]) -> Option<(f64, Option<f64>)> {
        let present: Vec<&FeatureValue> = values
            .iter()
            .map(Borrow::borrow)
            .filter(|v| !v.is_null())
            .collect();
        if present.is_empty() {
            return None;
        }
        match self {
            Baseline::Numeric { sample } => {
                let numbers: Vec<f64> = present.iter().filter_map(|v| v.as_f64()).collect();
                Some((psi(sample, &numbers, PSI_BINS)?, ks(sample, &numbers)))
            }
            Baseline::Categorical { shares, other } => {
                let current = category_shares(&present);
                let kept: f64 = shares
                    .iter()
                    .map(|(c, _)| current.get(c).copied().unwrap_or(0.0))
                    .sum();
                let term = |expected: f64, actual: f64| {
                    let (e, a) = (
                        expected.max(PSI_EMPTY_BIN_SHARE),
                        actual.max(PSI_EMPTY_BIN_SHARE),
                    );
                    (a - e) * (a / e).ln()
                };
                let psi = shares
                    .iter()
                    .map(|(category, expected)| {
                        term(*expected, current.get(category).copied().unwrap_or(0.0))
                    })
                    .sum::<f64>()
                    + term(*other, 1.0 - kept);
                Some((psi, None))
            }
        }
    }
}

fn category_shares(present: &[&FeatureValue]) -> HashMap<String, f64> {
    // Counted by borrowed text: one allocation per category, not per value.
    let mut counts: HashMap<Cow<'_, str>, usize> = HashMap::new();
    for value in present {
        let text = match value {
            FeatureValue::Str(text) => Some(Cow::Borrowed(text.as_str())),
            other => other.to_text().map(Cow::Owned),
        };
        if let Some(text) = text {
            *counts.entry(text).or_default() += 1;
        }
    }
    let total = present.len() as f64;
    counts
        .into_iter()
        .map(|(category, count)| (category.into_owned(), count as f64 / total))
        .collect()
}

/// Drift of one feature against its baseline under the view's thresholds.
pub fn drift_of<V: Borrow<FeatureValue>>(
    name: &str,
    baseline: &Baseline,
    values: &[V],
    psi_threshold: f64,
    ks_threshold: f64,
) -> Option<FeatureDrift> {
    let (psi, ks) = baseline.drift(values)?;
    Some(FeatureDrift {
        name: name.to_owned(),
        psi,
        ks,
        drifted: psi > psi_threshold || ks.is_some_and(|ks| ks > ks_threshold),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floats(values: impl IntoIterator<Item = f64>) -> Vec<FeatureValue> {
        values.into_iter().map(FeatureValue::Float).collect()
    }

    /// Deterministic pseudo-normal values: the sum of 12 uniforms minus 6.
    fn normal(n: usize, seed: u64, shift: f64) -> Vec<FeatureValue> {
        let mut state = seed;
        let mut uniform = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        floats((0..n).map(|_| (0..12).map(|_| uniform()).sum::<f64>() - 6.0 + shift))
    }

    #[test]
    fn statistics_of_numbers_and_missing() {
        let mut values = floats([1.0, 2.0, 3.0, 4.0]);
        values.push(FeatureValue::Null);
        let (stats, _) = profile("x", &values);
        assert_eq!(stats.count, 4);
        assert!((stats.missing_rate - 0.2).abs() < 1e-12);
        assert_eq!(stats.mean, Some(2.5));
        assert!((stats.std.unwrap_or_default() - 1.25f64.sqrt()).abs() < 1e-12);
        assert_eq!(stats.quantiles.first(), Some(&1.0));
        assert_eq!(stats.quantiles.get(5), Some(&2.5));
        assert_eq!(stats.quantiles.last(), Some(&4.0));
    }

    #[test]
    fn a_shifted_distribution_drifts_and_a_resample_does_not() {
        let baseline = profile("x", &normal(50_000, 1, 0.0))
            .1
            .unwrap_or(Baseline::Numeric { sample: vec![] });
        let same = drift_of("x", &baseline, &normal(20_000, 2, 0.0), 0.25, 0.2);
        let shifted = drift_of("x", &baseline, &normal(20_000, 3, 1.0), 0.25, 0.2);
        let (same, shifted) = (
            same.unwrap_or_else(|| panic!("no drift")),
            shifted.unwrap_or_else(|| panic!("no drift")),
        );
        assert!(!same.drifted && same.psi < 0.01, "{same:?}");
        assert!(shifted.drifted && shifted.psi > 0.25, "{shifted:?}");
        assert!(shifted.ks.unwrap_or_default() > 0.3, "{shifted:?}");
    }

    #[test]
    fn categorical_drift_compares_shares() {
        let strings = |pattern: &[&str], n: usize| -> Vec<FeatureValue> {
            (0..n)
                .map(|i| FeatureValue::Str(pattern[i % pattern.len()].to_owned()))
                .collect()
        };
        let (_, baseline) = profile("x", &strings(&["a", "b", "c", "d"], 4_000));
        let Some(baseline) = baseline else {
            panic!("no baseline")
        };
        let same = baseline
            .drift(&strings(&["d", "c", "b", "a"], 400))
            .map(|d| d.0);
        assert!(same.is_some_and(|psi| psi.abs() < 1e-9), "{same:?}");
        let moved = baseline
            .drift(&strings(&["a", "a", "a", "e"], 400))
            .map(|d| d.0);
        assert!(moved.is_some_and(|psi| psi > 1.0), "{moved:?}");
    }
}
