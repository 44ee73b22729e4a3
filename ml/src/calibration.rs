//! Post-training calibration: a monotone map from the model's logit to a click probability, fitted on held-out
//! examples the model did not train on, stored in the artifact and applied by every scorer (evaluation,
//! `score`, serving) through [`Calibrator::probability`], so offline metrics, gates and online scores agree.

use serde::{Deserialize, Serialize};

/// How a model's probabilities are calibrated after training.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum CalibrationMethod {
    /// The model's sigmoid as it is.
    None,
    /// Platt scaling: σ(a·z + b). Strictly monotone, so ranking (AUC) is unchanged; two parameters, so a
    /// few thousand held-out examples are enough.
    #[default]
    Platt,
    /// Isotonic regression of the label on the logit: any monotone shape, for large held-out sets; ties
    /// neighbouring scores, so AUC can move slightly.
    Isotonic,
}

/// A fitted calibration map.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase", tag = "method")]
pub enum Calibrator {
    /// p = σ(scale · z + offset).
    Platt { scale: f64, offset: f64 },
    /// p is interpolated linearly between the points `(logits[i], probabilities[i])` (logits increasing),
    /// and constant beyond the ends.
    Isotonic {
        logits: Vec<f64>,
        probabilities: Vec<f64>,
    },
}

/// Isotonic probabilities stay this far from 0 and 1: a block of held-out examples without a click must not
/// make a served probability exactly 0 (infinite log loss, a zero bid).
const ISOTONIC_FLOOR: f64 = 1e-6;

impl Calibrator {
    /// Fits `method` on held-out `logits` and their labels; `None` for [`CalibrationMethod::None`], or when
    /// the examples hold a single class (nothing to calibrate against).
    pub fn fit(method: CalibrationMethod, logits: &[f64], labels: &[bool]) -> Option<Calibrator> {
        let positives = labels.iter().filter(|&&label| label).count();
        if logits.len() != labels.len() || positives == 0 || positives == labels.len() {
            return None;
        }
        match method {
            CalibrationMethod::None => None,
            CalibrationMethod::Platt => Some(fit_platt(logits, labels, positives)),
            CalibrationMethod::Isotonic => Some(fit_isotonic(logits, labels)),
        }
    }

    /// Checks what [`Calibrator::probability`] relies on, for a calibrator read from an artifact: finite
    /// numbers, probabilities in [0, 1], and isotonic points of equal count in increasing logit order.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Calibrator::Platt { scale, offset } if !(scale.is_finite() && offset.is_finite()) => {
                Err("Platt scale and offset must be finite".to_owned())
            }
            Calibrator::Platt { .. } => Ok(()),
            Calibrator::Isotonic {
                logits,
                probabilities,
            } => {
                if logits.is_empty() || logits.len() != probabilities.len() {
                    return Err("isotonic points need as many probabilities as logits".to_owned());
                }
                if logits.iter().any(|z| !z.is_finite()) || logits.windows(2).any(|w| w[0] > w[1]) {
                    return Err("isotonic logits must be finite and increasing".to_owned());
                }
                if probabilities.iter().any(|p| !(0.0..=1.0).contains(p)) {
                    return Err("isotonic probabilities must lie in [0, 1]".to_owned());
                }
                Ok(())
            }
        }
    }

    /// The calibrated click probability of a raw logit.
    pub fn probability(&self, logit: f64) -> f64 {
        match self {
            Calibrator::Platt { scale, offset } => sigmoid(scale * logit + offset),
            Calibrator::Isotonic {
                logits,
                probabilities,
            } => interpolate(logits, probabilities, logit),
        }
    }
}

pub fn sigmoid(logit: f64) -> f64 {
    1.0 / (1.0 + (-logit).exp())
}

/// Platt's method: logistic regression of the label on the logit by Newton's method with a backtracking line
/// search (a plain Newton step overshoots from a saturated start), with Platt's smoothed targets
/// ((N₊ + 1)/(N₊ + 2) and 1/(N₋ + 2)) so a small held-out set cannot push probabilities to 0 or 1.
fn fit_platt(logits: &[f64], labels: &[bool], positives: usize) -> Calibrator {
    let negatives = labels.len() - positives;
    let high = (positives as f64 + 1.0) / (positives as f64 + 2.0);
    let low = 1.0 / (negatives as f64 + 2.0);
    let targets: Vec<f64> = labels.iter().map(|&l| if l { high } else { low }).collect();
    let loss = |scale: f64, offset: f64| -> f64 {
        logits
            .iter()
            .zip(&targets)
            .map(|(&z, &t)| {
                // Cross-entropy from the logit, stably: softplus(u) − t·u.
                let u = scale * z + offset;
                u.max(0.0) + (-u.abs()).exp().ln_1p() - t * u
            })
            .sum()
    };
    let (mut scale, mut offset) = (1.0, 0.0);
    let mut current = loss(scale, offset);
    for _ in 0..100 {
        // Gradient and Hessian of the cross-entropy in (scale, offset); a small ridge keeps the Hessian
        // invertible when the logits are (nearly) constant.
        let (mut g_scale, mut g_offset) = (0.0, 0.0);
        let (mut h_ss, mut h_so, mut h_oo) = (1e-9, 0.0, 1e-9);
        for (&z, &target) in logits.iter().zip(&targets) {
            let p = sigmoid(scale * z + offset);
            let residual = p - target;
            let weight = (p * (1.0 - p)).max(1e-12);
            g_scale += residual * z;
            g_offset += residual;
            h_ss += weight * z * z;
            h_so += weight * z;
            h_oo += weight;
        }
        let determinant = h_ss * h_oo - h_so * h_so;
        if determinant.abs() < 1e-18 {
            break;
        }
        let step_scale = (h_oo * g_scale - h_so * g_offset) / determinant;
        let step_offset = (h_ss * g_offset - h_so * g_scale) / determinant;
        let mut fraction = 1.0;
        let improved = loop {
            let (next_scale, next_offset) = (
                scale - fraction * step_scale,
                offset - fraction * step_offset,
            );
            let next = loss(next_scale, next_offset);
            if next <= current {
                scale = next_scale;
                offset = next_offset;
                break current - next;
            }
            fraction /= 2.0;
            if fraction < 1e-10 {
                break 0.0;
            }
        };
        current -= improved;
        if improved <= 1e-12 * current.abs().max(1.0) {
            break;
        }
    }
    Calibrator::Platt { scale, offset }
}

/// Pool-adjacent-violators over the examples sorted by logit; each pooled block becomes the points at its
/// lowest and highest logit.
fn fit_isotonic(logits: &[f64], labels: &[bool]) -> Calibrator {
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
    // Blocks of (sum of labels, count, lowest logit, highest logit); equal logits start in one block.
    let mut blocks: Vec<(f64, f64, f64, f64)> = Vec::new();
    for &row in &order {
        let (z, y) = (logits[row], f64::from(u8::from(labels[row])));
        match blocks.last_mut() {
            Some(last) if last.3 == z => {
                last.0 += y;
                last.1 += 1.0;
            }
            _ => blocks.push((y, 1.0, z, z)),
        }
        while blocks.len() >= 2 {
            let (after, before) = (blocks[blocks.len() - 1], blocks[blocks.len() - 2]);
            if before.0 / before.1 < after.0 / after.1 {
                break;
            }
            blocks.pop();
            if let Some(merged) = blocks.last_mut() {
                *merged = (before.0 + after.0, before.1 + after.1, before.2, after.3);
            }
        }
    }
    let mut points_logits = Vec::with_capacity(blocks.len() * 2);
    let mut points_probabilities = Vec::with_capacity(blocks.len() * 2);
    for (sum, count, lowest, highest) in blocks {
        let probability = (sum / count).clamp(ISOTONIC_FLOOR, 1.0 - ISOTONIC_FLOOR);
        points_logits.push(lowest);
        points_probabilities.push(probability);
        if highest > lowest {
            points_logits.push(highest);
            points_probabilities.push(probability);
        }
    }
    Calibrator::Isotonic {
        logits: points_logits,
        probabilities: points_probabilities,
    }
}

fn interpolate(xs: &[f64], ys: &[f64], x: f64) -> f64 {
    let (Some(&first), Some(&last)) = (xs.first(), xs.last()) else {
        return sigmoid(x);
    };
    if x <= first {
        return ys[0];
    }
    if x >= last {
        return ys[ys.len() - 1];
    }
    let upper = xs.partition_point(|&point| point <= x).min(xs.len() - 1);
    let lower = upper - 1;
    let span = xs[upper] - xs[lower];
    if span <= 0.0 {
        return ys[upper];
    }
    ys[lower] + (ys[upper] - ys[lower]) * (x - xs[lower]) / span
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits of a model that ranks well but is overconfident by a factor of 3 and shifted by +1.
    fn overconfident(n: usize) -> (Vec<f64>, Vec<bool>) {
        let mut logits = Vec::with_capacity(n);
        let mut labels = Vec::with_capacity(n);
        let mut state = 12345u64;
        for _ in 0..n {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let true_logit = ((state >> 11) as f64 / (1u64 << 53) as f64) * 6.0 - 4.0;
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let uniform = (state >> 11) as f64 / (1u64 << 53) as f64;
            labels.push(uniform < sigmoid(true_logit));
            logits.push(3.0 * true_logit + 1.0);
        }
        (logits, labels)
    }

    #[test]
    fn platt_recovers_the_distortion() {
        let (logits, labels) = overconfident(50_000);
        let Some(Calibrator::Platt { scale, offset }) =
            Calibrator::fit(CalibrationMethod::Platt, &logits, &labels)
        else {
            panic!("no Platt calibrator");
        };
        assert!((scale - 1.0 / 3.0).abs() < 0.02, "scale {scale}");
        assert!((offset + 1.0 / 3.0).abs() < 0.05, "offset {offset}");
    }

    #[test]
    fn calibrated_probabilities_sum_to_the_clicks() {
        let (logits, labels) = overconfident(20_000);
        let clicks = labels.iter().filter(|&&l| l).count() as f64;
        for method in [CalibrationMethod::Platt, CalibrationMethod::Isotonic] {
            let calibrator = Calibrator::fit(method, &logits, &labels)
                .unwrap_or_else(|| panic!("{method:?} fitted nothing"));
            let predicted: f64 = logits.iter().map(|&z| calibrator.probability(z)).sum();
            assert!(
                (predicted / clicks - 1.0).abs() < 0.01,
                "{method:?}: {predicted} predicted for {clicks} clicks"
            );
        }
    }

    #[test]
    fn isotonic_is_monotone_and_stays_inside_zero_and_one() {
        let (logits, labels) = overconfident(5_000);
        let calibrator = Calibrator::fit(CalibrationMethod::Isotonic, &logits, &labels)
            .unwrap_or_else(|| panic!("no isotonic calibrator"));
        let mut previous = 0.0;
        for step in -200..=200 {
            let p = calibrator.probability(f64::from(step) / 10.0);
            assert!(p >= previous && p > 0.0 && p < 1.0, "p({step}) = {p}");
            previous = p;
        }
    }

    #[test]
    fn a_damaged_calibrator_is_refused() {
        let unequal = Calibrator::Isotonic {
            logits: vec![0.0, 1.0],
            probabilities: vec![0.5],
        };
        let unordered = Calibrator::Isotonic {
            logits: vec![1.0, 0.0],
            probabilities: vec![0.4, 0.5],
        };
        let infinite = Calibrator::Platt {
            scale: f64::NAN,
            offset: 0.0,
        };
        for calibrator in [unequal, unordered, infinite] {
            assert!(calibrator.validate().is_err(), "{calibrator:?}");
        }
    }

    #[test]
    fn nothing_to_fit_without_both_classes() {
        assert_eq!(
            Calibrator::fit(CalibrationMethod::Platt, &[0.1, 0.2], &[true, true]),
            None
        );
        assert_eq!(
            Calibrator::fit(CalibrationMethod::None, &[0.1, 0.2], &[true, false]),
            None
        );
    }
}
