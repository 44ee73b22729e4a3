//! Per-feature statistics (status, and the drift baseline) and drift of new data against that baseline: PSI and
//! KS for numeric features (the ML core's definitions, equal to numpy/scipy), PSI over category shares for
//! strings.

use flywheel_crds::featureview::{FeatureDrift, FeatureStatistics};
use flywheel_ml::metrics::{PSI_EMPTY_BIN_SHARE, ks, psi, quantile_sorted};
use serde::{Deserialize, Serialize};

use crate::FastMap;

/// Order statistics a numeric baseline keeps: enough for PSI's deciles and a KS accurate to 1e-4.
pub const BASELINE_SAMPLE: usize = 10_000;
/// Categories a string baseline keeps by share; the rest pool into one "other" bin.
pub const BASELINE_CATEGORIES: usize = 32;
/// Bins of numeric PSI.
pub const PSI_BINS: usize = 10;

/// One feature's values as statistics read them: how many there are, and the present (non-null) ones.
#[derive(Clone, Debug, PartialEq)]
pub struct Observed<'a> {
    pub total: usize,
    pub present: Present<'a>,
}

/// A feature's present values: numbers (integers, floats and booleans as 0/1) or text.
#[derive(Clone, Debug, PartialEq)]
pub enum Present<'a> {
    Numbers(Vec<f64>),
    Texts(Texts<'a>),
}

/// Text values, counted as they are collected: statistics only ever read each category's share.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Texts<'a> {
    counts: FastMap<&'a str, usize>,
    len: usize,
}

impl Texts<'_> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<'a> FromIterator<&'a str> for Texts<'a> {
    fn from_iter<I: IntoIterator<Item = &'a str>>(texts: I) -> Texts<'a> {
        let mut counted = Texts::default();
        for text in texts {
            *counted.counts.entry(text).or_default() += 1;
            counted.len += 1;
        }
        counted
    }
}

impl Present<'_> {
    fn len(&self) -> usize {
        match self {
            Present::Numbers(numbers) => numbers.len(),
            Present::Texts(texts) => texts.len(),
        }
    }
}

/// The statistics (count, missing rate, and for numbers mean, standard deviation (population) and deciles
/// p0…p100) and the drift baseline of one feature's values, at once: its numbers are sorted once.
pub fn profile(name: &str, observed: Observed<'_>) -> (FeatureStatistics, Option<Baseline>) {
    let present = observed.present.len();
    let missing_rate = if observed.total == 0 {
        0.0
    } else {
        (observed.total - present) as f64 / observed.total as f64
    };
    let mut statistics = FeatureStatistics {
        name: name.to_owned(),
        count: present as i64,
        missing_rate,
        mean: None,
        std: None,
        quantiles: Vec::new(),
    };
    if present == 0 {
        return (statistics, None);
    }
    let baseline = match observed.present {
        Present::Texts(texts) => Baseline::of_categories(&texts),
        Present::Numbers(numbers) => {
            let numbers = sorted_numbers(numbers);
            let n = numbers.len() as f64;
            let mean = numbers.iter().sum::<f64>() / n;
            statistics.mean = Some(mean);
            statistics.std =
                Some((numbers.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n).sqrt());
            statistics.quantiles = (0..=10)
                .map(|i| quantile_sorted(&numbers, i as f64 / 10.0))
                .collect();
            Baseline::of_sorted_numbers(numbers)
        }
    };
    (statistics, Some(baseline))
}

/// Sorted ascending (total order) by the floats' order-preserving integer images, which sort faster than float
/// comparisons; the images take the numbers' own memory (no copy of a million values).
fn sorted_numbers(numbers: Vec<f64>) -> Vec<f64> {
    let mut keys: Vec<i64> = numbers
        .into_iter()
        .map(|x| {
            let bits = x.to_bits() as i64;
            bits ^ (((bits >> 63) as u64) >> 1) as i64
        })
        .collect();
    keys.sort_unstable();
    keys.into_iter()
        .map(|key| f64::from_bits((key ^ (((key >> 63) as u64) >> 1) as i64) as u64))
        .collect()
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
    fn of_categories(texts: &Texts<'_>) -> Baseline {
        let mut ranked: Vec<(String, f64)> = category_shares(texts)
            .into_iter()
            .map(|(category, share)| (category.to_owned(), share))
            .collect();
        ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let other = ranked
            .iter()
            .skip(BASELINE_CATEGORIES)
            .map(|(_, s)| s)
            .sum();
        ranked.truncate(BASELINE_CATEGORIES);
        Baseline::Categorical {
            shares: ranked,
            other,
        }
    }

    fn of_sorted_numbers(numbers: Vec<f64>) -> Baseline {
        let sample = if numbers.len() <= BASELINE_SAMPLE {
            numbers
        } else {
            (0..BASELINE_SAMPLE)
                .map(|i| quantile_sorted(&numbers, i as f64 / (BASELINE_SAMPLE - 1) as f64))
                .collect()
        };
        Baseline::Numeric { sample }
    }

    /// PSI (and KS for numbers) of the present values against this baseline; `None` when none is present
    /// or they are not of the baseline's kind.
    pub fn drift(&self, present: &Present<'_>) -> Option<(f64, Option<f64>)> {
        match (self, present) {
            (Baseline::Numeric { sample }, Present::Numbers(numbers)) => {
                Some((psi(sample, numbers, PSI_BINS)?, ks(sample, numbers)))
            }
            (Baseline::Categorical { shares, other }, Present::Texts(texts))
                if !texts.is_empty() =>
            {
                let current = category_shares(texts);
                let kept: f64 = shares
                    .iter()
                    .map(|(c, _)| current.get(c.as_str()).copied().unwrap_or(0.0))
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
                        term(
                            *expected,
                            current.get(category.as_str()).copied().unwrap_or(0.0),
                        )
                    })
                    .sum::<f64>()
                    + term(*other, 1.0 - kept);
                Some((psi, None))
            }
            _ => None,
        }
    }
}

fn category_shares<'a>(texts: &Texts<'a>) -> FastMap<&'a str, f64> {
    let total = texts.len as f64;
    texts
        .counts
        .iter()
        .map(|(&category, &count)| (category, count as f64 / total))
        .collect()
}

/// Drift of one feature against its baseline under the view's thresholds.
pub fn drift_of(
    name: &str,
    baseline: &Baseline,
    observed: &Observed<'_>,
    psi_threshold: f64,
    ks_threshold: f64,
) -> Option<FeatureDrift> {
    let (psi, ks) = baseline.drift(&observed.present)?;
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

    fn numbers(values: impl IntoIterator<Item = f64>) -> Observed<'static> {
        let numbers: Vec<f64> = values.into_iter().collect();
        Observed {
            total: numbers.len(),
            present: Present::Numbers(numbers),
        }
    }

    /// Deterministic pseudo-normal values: the sum of 12 uniforms minus 6.
    fn normal(n: usize, seed: u64, shift: f64) -> Observed<'static> {
        let mut state = seed;
        let mut uniform = move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        numbers((0..n).map(|_| (0..12).map(|_| uniform()).sum::<f64>() - 6.0 + shift))
    }

    #[test]
    fn statistics_of_numbers_and_missing() {
        let mut values = numbers([4.0, -0.0, 2.0, 3.0, 1.0, 0.0]);
        values.total += 1;
        let (stats, _) = profile("x", values);
        assert_eq!(stats.count, 6);
        assert!((stats.missing_rate - 1.0 / 7.0).abs() < 1e-12);
        assert_eq!(stats.mean, Some(10.0 / 6.0));
        assert_eq!(stats.quantiles.first(), Some(&-0.0));
        assert_eq!(stats.quantiles.get(5), Some(&1.5));
        assert_eq!(stats.quantiles.last(), Some(&4.0));
        let (empty, baseline) = profile("x", numbers([]));
        assert_eq!((empty.count, empty.missing_rate, baseline), (0, 0.0, None));
    }

    #[test]
    fn sorting_by_integer_images_is_the_total_order() {
        let mut values = vec![
            3.5,
            -1.0,
            f64::INFINITY,
            -0.0,
            0.0,
            -7.25,
            f64::NEG_INFINITY,
            1e-300,
        ];
        values.extend(
            (0..5_000).map(|i| ((i * 7919) % 1_000) as f64 * if i % 3 == 0 { -0.37 } else { 1.0 }),
        );
        let mut expected = values.clone();
        expected.sort_by(f64::total_cmp);
        let values = sorted_numbers(values);
        assert_eq!(
            values.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            expected.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_shifted_distribution_drifts_and_a_resample_does_not() {
        let baseline = profile("x", normal(50_000, 1, 0.0))
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
        let texts = |pattern: &[&'static str], n: usize| -> Observed<'static> {
            Observed {
                total: n,
                present: Present::Texts((0..n).map(|i| pattern[i % pattern.len()]).collect()),
            }
        };
        let (_, baseline) = profile("x", texts(&["a", "b", "c", "d"], 4_000));
        let Some(baseline) = baseline else {
            panic!("no baseline")
        };
        let same = baseline
            .drift(&texts(&["d", "c", "b", "a"], 400).present)
            .map(|d| d.0);
        assert!(same.is_some_and(|psi| psi.abs() < 1e-9), "{same:?}");
        let moved = baseline
            .drift(&texts(&["a", "a", "a", "e"], 400).present)
            .map(|d| d.0);
        assert!(moved.is_some_and(|psi| psi > 1.0), "{moved:?}");
        assert_eq!(baseline.drift(&Present::Numbers(vec![1.0])), None);
    }
}
