//! Joining labels to predictions by request id within an attribution window, and the windowed online quality
//! (AUC, calibration) computed from the joined pairs. Pure: time is always an argument.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

/// A prediction waiting for its label.
struct Pending {
    version: String,
    score: f64,
    at: Instant,
}

/// A prediction joined to its label.
#[derive(Clone, Debug, PartialEq)]
pub struct Labeled {
    pub version: String,
    pub score: f64,
    pub clicked: bool,
}

/// Predictions waiting for a label. A click inside the window labels a prediction positive; a prediction
/// still unlabeled when its window ends is labeled negative (an impression nobody clicked).
pub struct Attribution {
    window: Duration,
    capacity: usize,
    pending: HashMap<String, Pending>,
    /// Arrival order, for expiry; entries already labeled are skipped when they come up.
    order: VecDeque<(Instant, String)>,
}

impl Attribution {
    pub fn new(window: Duration, capacity: usize) -> Self {
        Attribution {
            window,
            capacity: capacity.max(1),
            pending: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Remembers a prediction; returns how many of the oldest were forgotten unlabeled to stay in capacity.
    pub fn record(&mut self, id: String, version: &str, score: f64, now: Instant) -> usize {
        let mut evicted = 0;
        while self.pending.len() >= self.capacity {
            let Some((at, oldest)) = self.order.pop_front() else {
                break;
            };
            if self.pending.get(&oldest).is_some_and(|p| p.at == at) {
                self.pending.remove(&oldest);
                evicted += 1;
            }
        }
        self.order.push_back((now, id.clone()));
        self.pending.insert(
            id,
            Pending {
                version: version.to_owned(),
                score,
                at: now,
            },
        );
        evicted
    }

    /// Labels the prediction of `id`; `None` when it is unknown, already labeled or past its window.
    pub fn label(&mut self, id: &str, clicked: bool, now: Instant) -> Option<Labeled> {
        let pending = self.pending.get(id)?;
        if now.saturating_duration_since(pending.at) > self.window {
            return None;
        }
        let pending = self.pending.remove(id)?;
        Some(Labeled {
            version: pending.version,
            score: pending.score,
            clicked,
        })
    }

    /// Ends the window of every prediction older than it: each becomes a negative.
    pub fn expire(&mut self, now: Instant) -> Vec<Labeled> {
        let mut negatives = Vec::new();
        while let Some((at, _)) = self.order.front() {
            if now.saturating_duration_since(*at) <= self.window {
                break;
            }
            let Some((at, id)) = self.order.pop_front() else {
                break;
            };
            if self.pending.get(&id).is_some_and(|p| p.at == at)
                && let Some(pending) = self.pending.remove(&id)
            {
                negatives.push(Labeled {
                    version: pending.version,
                    score: pending.score,
                    clicked: false,
                });
            }
        }
        negatives
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }
}

/// The labeled predictions of the last `span` (at most `max_samples`), per model version.
pub struct QualityWindow {
    span: Duration,
    max_samples: usize,
    samples: BTreeMap<String, VecDeque<(Instant, f64, bool)>>,
}

/// Online quality of one version over the window.
#[derive(Clone, Debug, PartialEq)]
pub struct Quality {
    pub samples: usize,
    pub clicks: usize,
    /// `None` until the window holds both a click and a non-click.
    pub auc: Option<f64>,
    /// Σ predicted / Σ clicked; `None` without clicks.
    pub calibration: Option<f64>,
}

impl QualityWindow {
    pub fn new(span: Duration, max_samples: usize) -> Self {
        QualityWindow {
            span,
            max_samples: max_samples.max(1),
            samples: BTreeMap::new(),
        }
    }

    pub fn add(&mut self, labeled: &Labeled, now: Instant) {
        let samples = self.samples.entry(labeled.version.clone()).or_default();
        samples.push_back((now, labeled.score, labeled.clicked));
        while samples.len() > self.max_samples {
            samples.pop_front();
        }
    }

    /// Quality of every version with samples in the window at `now`.
    pub fn measure(&mut self, now: Instant) -> BTreeMap<String, Quality> {
        let span = self.span;
        self.samples.retain(|_, samples| {
            while samples
                .front()
                .is_some_and(|(at, _, _)| now.saturating_duration_since(*at) > span)
            {
                samples.pop_front();
            }
            !samples.is_empty()
        });
        self.samples
            .iter()
            .map(|(version, samples)| {
                let scores: Vec<f64> = samples.iter().map(|s| s.1).collect();
                let labels: Vec<bool> = samples.iter().map(|s| s.2).collect();
                let clicks = labels.iter().filter(|&&c| c).count();
                let predicted: f64 = scores.iter().sum();
                (
                    version.clone(),
                    Quality {
                        samples: samples.len(),
                        clicks,
                        auc: flywheel_ml::metrics::auc(&scores, &labels),
                        calibration: (clicks > 0).then(|| predicted / clicks as f64),
                    },
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clicks_inside_the_window_label_positive_and_silence_labels_negative() {
        let start = Instant::now();
        let mut attribution = Attribution::new(Duration::from_secs(60), 10);
        attribution.record("a".into(), "v1", 0.9, start);
        attribution.record("b".into(), "v1", 0.2, start);
        let clicked = attribution.label("a", true, start + Duration::from_secs(30));
        assert_eq!(
            clicked,
            Some(Labeled {
                version: "v1".into(),
                score: 0.9,
                clicked: true
            })
        );
        assert_eq!(attribution.label("a", true, start), None, "labeled twice");
        assert_eq!(attribution.expire(start + Duration::from_secs(59)), vec![]);
        let negatives = attribution.expire(start + Duration::from_secs(61));
        assert_eq!(negatives.len(), 1);
        assert!(!negatives[0].clicked && negatives[0].score == 0.2);
        assert_eq!(attribution.pending(), 0);
        attribution.record("c".into(), "v1", 0.5, start);
        assert_eq!(
            attribution.label("c", true, start + Duration::from_secs(61)),
            None,
            "a click after the window is not attributed"
        );
    }

    #[test]
    fn capacity_forgets_the_oldest() {
        let now = Instant::now();
        let mut attribution = Attribution::new(Duration::from_secs(60), 2);
        assert_eq!(attribution.record("a".into(), "v", 0.1, now), 0);
        assert_eq!(attribution.record("b".into(), "v", 0.1, now), 0);
        assert_eq!(attribution.record("c".into(), "v", 0.1, now), 1);
        assert_eq!(attribution.label("a", true, now), None);
        assert!(attribution.label("c", true, now).is_some());
    }

    #[test]
    fn quality_matches_the_ml_metrics_and_forgets_old_samples() {
        let start = Instant::now();
        let mut window = QualityWindow::new(Duration::from_secs(10), 100);
        let pairs = [(0.9, true), (0.8, false), (0.3, true), (0.1, false)];
        for (score, clicked) in pairs {
            let labeled = Labeled {
                version: "v1".into(),
                score,
                clicked,
            };
            window.add(&labeled, start);
        }
        let quality = window.measure(start);
        let v1 = &quality["v1"];
        let scores: Vec<f64> = pairs.iter().map(|p| p.0).collect();
        let labels: Vec<bool> = pairs.iter().map(|p| p.1).collect();
        assert_eq!(v1.auc, flywheel_ml::metrics::auc(&scores, &labels));
        assert_eq!(v1.calibration, Some(2.1 / 2.0));
        assert!(window.measure(start + Duration::from_secs(11)).is_empty());
    }
}
