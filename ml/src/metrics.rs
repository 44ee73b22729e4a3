//! Offline and online model-quality metrics, defined to agree with scikit-learn and scipy (see
//! `ml/tests/reference/`): AUC, GAUC, LogLoss, calibration, and the drift statistics PSI and KS.

use std::collections::BTreeMap;

/// Area under the ROC curve (Mann–Whitney U with average ranks for tied scores), as
/// `sklearn.metrics.roc_auc_score`. `None` when `labels` hold a single class or lengths differ.
pub fn auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    if scores.len() != labels.len() {
        return None;
    }
    let positives = labels.iter().filter(|&&label| label).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    // Sum of the (1-based, tie-averaged) ranks of the positives.
    let mut positive_rank_sum = 0.0;
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        let average_rank = (start + 1 + end) as f64 / 2.0;
        let tied_positives = order[start..end].iter().filter(|&&i| labels[i]).count();
        positive_rank_sum += average_rank * tied_positives as f64;
        start = end;
    }
    let (p, n) = (positives as f64, negatives as f64);
    Some((positive_rank_sum - p * (p + 1.0) / 2.0) / (p * n))
}

/// Group AUC: the AUC of each group (user) weighted by its number of impressions; groups with a single class
/// are skipped. `None` when no group has both classes.
pub fn gauc(scores: &[f64], labels: &[bool], groups: &[u64]) -> Option<f64> {
    if scores.len() != labels.len() || scores.len() != groups.len() {
        return None;
    }
    // Ordered, so the weighted sum adds up in the same order on every run.
    let mut members: BTreeMap<u64, Vec<usize>> = BTreeMap::new();
    for (index, group) in groups.iter().enumerate() {
        members.entry(*group).or_default().push(index);
    }
    let mut weighted = 0.0;
    let mut weight = 0.0;
    for rows in members.values() {
        let group_scores: Vec<f64> = rows.iter().map(|&i| scores[i]).collect();
        let group_labels: Vec<bool> = rows.iter().map(|&i| labels[i]).collect();
        if let Some(group_auc) = auc(&group_scores, &group_labels) {
            weighted += group_auc * rows.len() as f64;
            weight += rows.len() as f64;
        }
    }
    (weight > 0.0).then(|| weighted / weight)
}

/// Mean binary cross-entropy, with probabilities clipped to `[ε, 1 − ε]` (ε = machine epsilon), as
/// `sklearn.metrics.log_loss`. `None` for empty or mismatched input.
pub fn log_loss(probabilities: &[f64], labels: &[bool]) -> Option<f64> {
    if probabilities.is_empty() || probabilities.len() != labels.len() {
        return None;
    }
    let eps = f64::EPSILON;
    let total: f64 = probabilities
        .iter()
        .zip(labels)
        .map(|(&p, &label)| {
            let p = p.clamp(eps, 1.0 - eps);
            if label { -p.ln() } else { -(1.0 - p).ln() }
        })
        .sum();
    Some(total / probabilities.len() as f64)
}

/// Σ predicted / Σ positive: 1.0 is calibrated, above 1 over-predicts clicks. `None` without positives.
pub fn calibration(probabilities: &[f64], labels: &[bool]) -> Option<f64> {
    let positives = labels.iter().filter(|&&label| label).count();
    if positives == 0 || probabilities.len() != labels.len() {
        return None;
    }
    Some(probabilities.iter().sum::<f64>() / positives as f64)
}

/// Share floor for an empty PSI bin, so the logarithm stays finite.
pub const PSI_EMPTY_BIN_SHARE: f64 = 1e-6;

/// Population Stability Index of `actual` against `expected`: bins are the `bins`-quantiles of `expected`
/// (numpy's linear interpolation); a value goes to the bin of the number of edges at or below it; shares are
/// floored at [`PSI_EMPTY_BIN_SHARE`]. PSI = Σ (a − e) · ln(a / e). `None` for empty input or `bins < 2`.
pub fn psi(expected: &[f64], actual: &[f64], bins: usize) -> Option<f64> {
    if expected.is_empty() || actual.is_empty() || bins < 2 {
        return None;
    }
    let mut sorted = expected.to_vec();
    sorted.sort_by(f64::total_cmp);
    let edges: Vec<f64> = (1..bins)
        .map(|i| quantile_sorted(&sorted, i as f64 / bins as f64))
        .collect();
    let shares = |values: &[f64]| -> Vec<f64> {
        let mut counts = vec![0usize; bins];
        for value in values {
            counts[edges.partition_point(|edge| edge <= value)] += 1;
        }
        counts
            .into_iter()
            .map(|count| (count as f64 / values.len() as f64).max(PSI_EMPTY_BIN_SHARE))
            .collect()
    };
    let (e, a) = (shares(expected), shares(actual));
    Some(e.iter().zip(&a).map(|(e, a)| (a - e) * (a / e).ln()).sum())
}

/// Two-sample Kolmogorov–Smirnov statistic: the largest distance between the empirical CDFs, as
/// `scipy.stats.ks_2samp(...).statistic`. `None` for empty input.
pub fn ks(first: &[f64], second: &[f64]) -> Option<f64> {
    if first.is_empty() || second.is_empty() {
        return None;
    }
    let mut a = first.to_vec();
    let mut b = second.to_vec();
    a.sort_by(f64::total_cmp);
    b.sort_by(f64::total_cmp);
    let (n, m) = (a.len() as f64, b.len() as f64);
    let (mut i, mut j) = (0, 0);
    let mut distance: f64 = 0.0;
    while i < a.len() && j < b.len() {
        let x = a[i].min(b[j]);
        while i < a.len() && a[i] <= x {
            i += 1;
        }
        while j < b.len() && b[j] <= x {
            j += 1;
        }
        distance = distance.max((i as f64 / n - j as f64 / m).abs());
    }
    Some(distance)
}

/// The `q`-quantile of sorted data with linear interpolation (numpy's default).
pub fn quantile_sorted(sorted: &[f64], q: f64) -> f64 {
    let position = q * (sorted.len() - 1) as f64;
    let lower = position.floor() as usize;
    let upper = position.ceil() as usize;
    let fraction = position - lower as f64;
    sorted[lower] + (sorted[upper] - sorted[lower]) * fraction
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_of_a_perfect_and_a_reversed_ranking() {
        let labels = [false, false, true, true];
        assert_eq!(auc(&[0.1, 0.2, 0.3, 0.4], &labels), Some(1.0));
        assert_eq!(auc(&[0.4, 0.3, 0.2, 0.1], &labels), Some(0.0));
        assert_eq!(auc(&[0.5, 0.5, 0.5, 0.5], &labels), Some(0.5));
        assert_eq!(auc(&[0.1, 0.2], &[true, true]), None);
    }

    #[test]
    fn gauc_skips_single_class_groups() {
        let scores = [0.1, 0.9, 0.2, 0.8, 0.3];
        let labels = [false, true, true, false, true];
        let groups = [1, 1, 2, 2, 3];
        // group 1: AUC 1 (2 rows), group 2: AUC 0 (2 rows), group 3: one class, skipped.
        assert_eq!(gauc(&scores, &labels, &groups), Some(0.5));
    }

    #[test]
    fn calibration_and_log_loss_edges() {
        assert_eq!(calibration(&[0.5, 0.5], &[true, false]), Some(1.0));
        assert_eq!(calibration(&[0.5], &[false]), None);
        let clipped = log_loss(&[0.0], &[true]).unwrap_or_default();
        assert!((clipped - (-f64::EPSILON.ln())).abs() < 1e-12);
    }

    #[test]
    fn identical_distributions_have_no_drift() {
        let values: Vec<f64> = (0..1000).map(|i| (i % 97) as f64).collect();
        assert!(psi(&values, &values, 10).unwrap_or(1.0).abs() < 1e-12);
        assert_eq!(ks(&values, &values), Some(0.0));
    }
}
