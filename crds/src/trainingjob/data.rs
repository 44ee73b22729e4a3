//! Where a TrainingJob's data comes from: a FeatureView (point-in-time joins, sample joining), the traffic a
//! Rollout served, or ready-made Parquet sets; and the event-time ranges the sets cover.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{DNS_LABEL_PATTERN, Duration, TimeRange};
use crate::featureview::STORAGE_URI_PATTERN;

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.featureView) ? 1 : 0) + (has(self.servedTraffic) ? 1 : 0) + (has(self.dataset) ? 1 : 0) == 1").message("spec.data: set exactly one of featureView, servedTraffic or dataset"))]
pub struct TrainingData {
    /// Build the training set from a FeatureView with point-in-time joins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_view: Option<FeatureViewData>,
    /// Build the training set from what a Rollout served: one row per logged prediction, with the features as
    /// they were scored, labeled by its clicks. The model keeps the served model's feature schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_traffic: Option<ServedTrafficData>,
    /// Use ready-made Parquet training and evaluation sets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<DatasetUris>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FeatureViewData {
    /// The FeatureView, in the job's namespace, whose features are joined onto the events as of each event's
    /// time (point in time: no feature from after the event).
    #[schemars(pattern(DNS_LABEL_PATTERN), length(max = 63))]
    pub name: String,
    /// Labeled events: a Parquet file or directory on the training storage (`file://`) with the view's join
    /// keys, the event time and the label. Each event is one training row.
    #[schemars(pattern(STORAGE_URI_PATTERN), length(max = 2048))]
    pub events: String,
    /// Event-time column of the events.
    #[serde(default = "default_event_time")]
    #[schemars(length(min = 1, max = 63))]
    pub timestamp_field: String,
    /// Label column of the events (e.g. `clicked`). With `sampleJoin`, `label_click` or `label_convert`: the
    /// labels sample joining writes.
    #[schemars(length(min = 1, max = 63))]
    pub label: String,
    /// The events are impressions without labels: label each by joining its clicks (and their conversions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_join: Option<SampleJoinData>,
    /// Events whose time falls in this range train the model: `start` and `end`, or `last` (e.g. `7d`): that
    /// long before the evaluation range starts.
    pub train_range: EventRange,
    /// Events in this range evaluate it: `start` and `end`, or `last` (e.g. `1d`): that long before the job
    /// was created. It must start at or after the end of `trainRange`, so evaluation never sees the training
    /// period.
    pub eval_range: EventRange,
}

/// Impressions labeled by their clicks: `label_click` when a click with the impression's request id follows it
/// within `clickWindow`, `label_convert` when one of those clicks is followed by a conversion with its click id
/// within `conversionWindow`. A click counted twice never duplicates its impression.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SampleJoinData {
    /// Clicks: a Parquet file or directory (`file://`) with the request id, the click id and the event time.
    #[schemars(pattern(STORAGE_URI_PATTERN), length(max = 2048))]
    pub clicks: String,
    /// Conversions: a Parquet file or directory (`file://`) with the click id and the event time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(STORAGE_URI_PATTERN), length(max = 2048))]
    pub conversions: Option<String>,
    /// How long after its impression a click counts (default `30m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub click_window: Option<Duration>,
    /// How long after its click a conversion counts (default `7d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversion_window: Option<Duration>,
    /// Request id column of the impressions and the clicks (default `request_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub request_id_column: Option<String>,
    /// Click id column of the clicks and the conversions (default `click_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub click_id_column: Option<String>,
}

impl SampleJoinData {
    pub fn click_window(&self) -> &str {
        self.click_window.as_ref().map_or("30m", |d| d.0.as_str())
    }

    pub fn conversion_window(&self) -> &str {
        self.conversion_window
            .as_ref()
            .map_or("7d", |d| d.0.as_str())
    }

    pub fn request_id_column(&self) -> &str {
        self.request_id_column.as_deref().unwrap_or("request_id")
    }

    pub fn click_id_column(&self) -> &str {
        self.click_id_column.as_deref().unwrap_or("click_id")
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServedTrafficData {
    /// The Rollout, in the job's namespace, whose `spec.feedback.trafficLog` holds the traffic. Its stable
    /// version's artifact gives the feature schema.
    #[schemars(pattern(DNS_LABEL_PATTERN), length(max = 63))]
    pub rollout: String,
    /// A click labels its prediction when it arrives within this long of it (default `30m`). Predictions whose
    /// window has not closed by the end of the log are left out, not counted as negatives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub click_window: Option<Duration>,
    /// Predictions served in this range train the model: `start` and `end`, or `last` (e.g. `7d`) before the
    /// evaluation range starts.
    pub train_range: EventRange,
    /// Predictions served in this range evaluate it: `start` and `end`, or `last` (e.g. `1d`) before the job
    /// was created.
    pub eval_range: EventRange,
}

impl ServedTrafficData {
    pub const DEFAULT_CLICK_WINDOW: &str = "30m";

    /// The absolute (train, eval) ranges for a job created at `created`.
    pub fn ranges(&self, created: jiff::Timestamp) -> Option<(TimeRange, TimeRange)> {
        resolve_ranges(&self.train_range, &self.eval_range, created)
    }

    pub fn click_window(&self) -> &str {
        self.click_window
            .as_ref()
            .map_or(Self::DEFAULT_CLICK_WINDOW, |w| w.0.as_str())
    }
}

/// Evaluation counts back from `created`, training from the evaluation's start.
fn resolve_ranges(
    train: &EventRange,
    eval: &EventRange,
    created: jiff::Timestamp,
) -> Option<(TimeRange, TimeRange)> {
    let eval = eval.resolve(created)?;
    let train = train.resolve(eval.start.0)?;
    Some((train, eval))
}

/// A range of event times: absolute (`start`, `end`) or relative (`last`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.start) && has(self.end)) != has(self.last)").message("set start and end, or last"))]
pub struct EventRange {
    /// Inclusive start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<Time>,
    /// Exclusive end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<Time>,
    /// The span before a reference time (the job's creation, or the evaluation range's start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Duration>,
}

impl EventRange {
    /// The absolute range: as given, or `last` before `reference`; `None` when neither form is complete or
    /// `last` does not parse.
    pub fn resolve(&self, reference: jiff::Timestamp) -> Option<TimeRange> {
        match (&self.start, &self.end, &self.last) {
            (Some(start), Some(end), None) => Some(TimeRange {
                start: start.clone(),
                end: end.clone(),
            }),
            (None, None, Some(last)) => {
                let span = jiff::SignedDuration::try_from(last.parse().ok()?).ok()?;
                Some(TimeRange {
                    start: Time(reference.checked_sub(span).ok()?),
                    end: Time(reference),
                })
            }
            _ => None,
        }
    }
}

impl FeatureViewData {
    /// The absolute (train, eval) ranges for a job created at `created`.
    pub fn ranges(&self, created: jiff::Timestamp) -> Option<(TimeRange, TimeRange)> {
        resolve_ranges(&self.train_range, &self.eval_range, created)
    }
}

fn default_event_time() -> String {
    "event_timestamp".to_owned()
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetUris {
    /// Training set: a Parquet file or directory (`file://` on the training storage).
    #[schemars(pattern(STORAGE_URI_PATTERN), length(max = 2048))]
    pub train: String,
    /// Evaluation set, scored after training for the offline metrics: a Parquet file or directory (`file://`
    /// on the training storage).
    #[schemars(pattern(STORAGE_URI_PATTERN), length(max = 2048))]
    pub eval: String,
    /// Label column (e.g. `clicked`).
    #[schemars(length(min = 1, max = 63))]
    pub label: String,
    /// Feature schema JSON the features are encoded with; defaults to `schema.json` beside `train`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(STORAGE_URI_PATTERN), length(max = 2048))]
    pub schema: Option<String>,
}
