//! Rollout analysis: the PromQL of each metric (built-ins over the serving metrics, or the user's query with
//! `{{stable}}`, `{{canary}}`, `{{rollout}}`, `{{namespace}}`, `{{interval}}` filled in), the verdict of one
//! measurement, and the instant query that takes one (over [`crate::rollout::prometheus`]).

use std::time::Duration;

use flywheel_crds::rollout::{AnalysisMetric, BuiltinMetric, MeasurementVerdict};
use serde::Deserialize;

use crate::rollout::prometheus::{self, Access, PrometheusError};

/// The versions and endpoint a query is about.
pub struct QueryContext<'a> {
    pub rollout: &'a str,
    pub namespace: &'a str,
    pub stable: &'a str,
    pub canary: &'a str,
    /// The analysis interval as PromQL range text (`60s`).
    pub interval: String,
}

/// The series of one version of this rollout. The namespace (the scrape's target label) keeps a Rollout from
/// reading, or aborting on, the series of a namesake in another namespace.
fn selector(context: &QueryContext<'_>, version: &str) -> String {
    format!(
        "namespace=\"{}\",model=\"{}\",version=\"{version}\"",
        context.namespace, context.rollout
    )
}

/// Whether the alert `alert` fires for this rollout (in its namespace) and, when it names a version, for the
/// canary: the stable version's trouble is no reason to roll a canary back.
pub fn alert_query(alert: &str, context: &QueryContext<'_>) -> String {
    format!(
        "count(ALERTS{{alertstate=\"firing\",alertname=\"{alert}\",namespace=\"{}\",model=\"{}\",version=~\"{}|\"}})",
        context.namespace, context.rollout, context.canary
    )
}

/// The PromQL of a metric.
pub fn query(metric: &AnalysisMetric, context: &QueryContext<'_>) -> String {
    let canary = selector(context, context.canary);
    let stable = selector(context, context.stable);
    let interval = &context.interval;
    match (metric.builtin, &metric.query) {
        (Some(BuiltinMetric::AucDrop), _) => format!(
            "avg(flywheel_serving_online_auc{{{stable}}}) - avg(flywheel_serving_online_auc{{{canary}}})"
        ),
        (Some(BuiltinMetric::CalibrationDeviation), _) => {
            format!("abs(avg(flywheel_serving_online_calibration{{{canary}}}) - 1)")
        }
        (Some(BuiltinMetric::LatencyP99), _) => format!(
            "histogram_quantile(0.99, sum by (le) (rate(flywheel_serving_request_duration_seconds_bucket{{{canary}}}[{interval}])))"
        ),
        // A version that never failed has no error series: its error count is 0, not unknown. Requests the
        // router could not deliver to the canary (a crash-looping pod, a refused connection) never reached its
        // servers and count as errors too. Without any request the ratio is NaN: inconclusive.
        (Some(BuiltinMetric::ErrorRate), _) => {
            let undelivered = format!(
                "(sum(rate(flywheel_router_upstream_failures_total{{namespace=\"{}\",model=\"{}\",backend=\"{}\"}}[{interval}])) or vector(0))",
                context.namespace, context.rollout, context.canary
            );
            format!(
                "((sum(rate(flywheel_serving_requests_total{{{canary},code!=\"OK\"}}[{interval}])) or vector(0)) + {undelivered}) / ((sum(rate(flywheel_serving_requests_total{{{canary}}}[{interval}])) or vector(0)) + {undelivered})"
            )
        }
        (None, Some(text)) => text
            .replace("{{stable}}", context.stable)
            .replace("{{canary}}", context.canary)
            .replace("{{rollout}}", context.rollout)
            .replace("{{namespace}}", context.namespace)
            .replace("{{interval}}", interval),
        (None, None) => String::new(),
    }
}

/// Labeled predictions of the canary in its quality window: below `minSamples` a measurement is inconclusive.
pub fn samples_query(context: &QueryContext<'_>) -> String {
    format!(
        "sum(flywheel_serving_online_window_samples{{{}}})",
        selector(context, context.canary)
    )
}

/// Whether a built-in needs labeled samples (quality metrics do; latency and errors do not).
pub fn needs_labels(metric: &AnalysisMetric) -> bool {
    matches!(
        metric.builtin,
        Some(BuiltinMetric::AucDrop | BuiltinMetric::CalibrationDeviation)
    )
}

/// The answer to one query.
#[derive(Clone, Debug, PartialEq)]
pub enum QueryResult {
    /// The first sample's value (NaN included).
    Value(f64),
    /// No series matched.
    Empty,
    /// The query failed.
    Error(String),
}

/// One metric's measurement.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub value: Option<f64>,
    pub verdict: MeasurementVerdict,
    pub message: String,
}

/// Judges a metric's result against its bounds. Too few labeled samples, no series and NaN are inconclusive,
/// never failed: a canary is only rolled back on evidence.
pub fn judge(
    metric: &AnalysisMetric,
    result: &QueryResult,
    samples: Option<f64>,
    min_samples: u64,
) -> Verdict {
    if needs_labels(metric) {
        let have = samples.filter(|s| s.is_finite()).unwrap_or(0.0);
        if have < min_samples as f64 {
            return Verdict {
                value: None,
                verdict: MeasurementVerdict::Inconclusive,
                message: format!("{have} labeled samples, {min_samples} needed"),
            };
        }
    }
    match result {
        QueryResult::Error(error) => Verdict {
            value: None,
            verdict: MeasurementVerdict::Error,
            message: error.clone(),
        },
        QueryResult::Empty => Verdict {
            value: None,
            verdict: MeasurementVerdict::Inconclusive,
            message: "the query returned no data".to_owned(),
        },
        QueryResult::Value(value) if !value.is_finite() => Verdict {
            value: None,
            verdict: MeasurementVerdict::Inconclusive,
            message: format!("the query returned {value}"),
        },
        QueryResult::Value(value) => {
            let value = *value;
            let below = metric.min.filter(|min| value < *min);
            let above = metric.max.filter(|max| value > *max);
            let (verdict, message) = match (below, above) {
                (Some(min), _) => (
                    MeasurementVerdict::Failed,
                    format!("{} = {value} < min {min}", metric.name),
                ),
                (_, Some(max)) => (
                    MeasurementVerdict::Failed,
                    format!("{} = {value} > max {max}", metric.name),
                ),
                _ => (
                    MeasurementVerdict::Successful,
                    format!("{} = {value} within bounds", metric.name),
                ),
            };
            Verdict {
                value: Some(value),
                verdict,
                message,
            }
        }
    }
}

/// PromQL duration text of an interval.
pub fn range(interval: Duration) -> String {
    format!("{}s", interval.as_secs().max(1))
}

#[derive(Deserialize)]
struct Answer {
    status: String,
    #[serde(default)]
    data: Option<AnswerData>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AnswerData {
    result_type: String,
    result: serde_json::Value,
}

/// Parses an instant-query answer: a vector's first sample, a scalar, or nothing.
pub fn parse_answer(body: &[u8]) -> Result<QueryResult, PrometheusError> {
    let answer: Answer =
        serde_json::from_slice(body).map_err(|err| PrometheusError::Decode(err.to_string()))?;
    if answer.status != "success" {
        return Ok(QueryResult::Error(
            answer.error.unwrap_or_else(|| answer.status.clone()),
        ));
    }
    let Some(data) = answer.data else {
        return Ok(QueryResult::Empty);
    };
    let sample = match data.result_type.as_str() {
        "vector" => data.result.get(0).and_then(|s| s.get("value")).cloned(),
        "scalar" => Some(data.result),
        other => {
            return Ok(QueryResult::Error(format!(
                "a {other} result; analysis queries must return one number"
            )));
        }
    };
    let Some(sample) = sample else {
        return Ok(QueryResult::Empty);
    };
    let text = sample
        .get(1)
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| PrometheusError::Decode(sample.to_string()))?;
    // Prometheus writes NaN and ±Inf as text, which Rust parses too.
    text.parse::<f64>()
        .map(QueryResult::Value)
        .map_err(|_| PrometheusError::Decode(format!("sample value {text}")))
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|byte| match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (byte as char).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// Runs an instant query against `base` (`http(s)://host:port[/prefix]`) with `access`, within `timeout`.
pub async fn instant_query(
    base: &str,
    promql: &str,
    access: &Access,
    timeout: Duration,
) -> QueryResult {
    let path = format!("api/v1/query?query={}", percent_encode(promql));
    match tokio::time::timeout(timeout, prometheus::get(base, &path, access)).await {
        // Prometheus answers bad queries with 400 and a JSON error body, which parse_answer reports.
        Ok(Ok((200 | 400 | 422, body))) => {
            parse_answer(&body).unwrap_or_else(|err| QueryResult::Error(err.to_string()))
        }
        Ok(Ok((status, body))) => QueryResult::Error(
            PrometheusError::Status {
                status,
                body: String::from_utf8_lossy(&body).chars().take(200).collect(),
            }
            .to_string(),
        ),
        Ok(Err(err)) => QueryResult::Error(err.to_string()),
        Err(_) => QueryResult::Error(format!("prometheus did not answer within {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_prometheus_answer_is_a_value_nothing_or_an_error(body in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse_answer(&body);
        }

        #[test]
        fn any_vector_or_scalar_shape_is_handled(
            kind in prop::sample::select(vec!["vector", "scalar", "matrix", "string", ""]),
            value in prop::sample::select(vec![serde_json::json!("1.5"), serde_json::json!("NaN"), serde_json::json!(2), serde_json::json!(null), serde_json::json!([1, "x"])]),
            samples in 0usize..3,
        ) {
            let result = match kind {
                "vector" => serde_json::json!(vec![serde_json::json!({"metric": {}, "value": [1, value.clone()]}); samples]),
                _ => serde_json::json!([1, value]),
            };
            let body = serde_json::json!({"status": "success", "data": {"resultType": kind, "result": result}});
            let _ = parse_answer(body.to_string().as_bytes());
        }
    }

    #[tokio::test]
    async fn an_endless_prometheus_answer_is_cut_off_with_a_clear_error() {
        let address = crate::hostile_server::endless()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let result = instant_query(
            &format!("http://{address}"),
            "up",
            &Access::default(),
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(
            result,
            QueryResult::Error(PrometheusError::TooLarge(prometheus::MAX_ANSWER_BYTES).to_string())
        );
    }

    fn metric(
        builtin: Option<BuiltinMetric>,
        min: Option<f64>,
        max: Option<f64>,
    ) -> AnalysisMetric {
        AnalysisMetric {
            name: "m".into(),
            builtin,
            query: None,
            min,
            max,
        }
    }

    fn context() -> QueryContext<'static> {
        QueryContext {
            rollout: "ctr",
            namespace: "ml",
            stable: "ctr-v1",
            canary: "ctr-v2",
            interval: "60s".into(),
        }
    }

    #[test]
    fn builtins_compare_the_canary_with_the_stable_version() {
        let drop = query(
            &metric(Some(BuiltinMetric::AucDrop), None, Some(0.005)),
            &context(),
        );
        assert_eq!(
            drop,
            "avg(flywheel_serving_online_auc{namespace=\"ml\",model=\"ctr\",version=\"ctr-v1\"}) - avg(flywheel_serving_online_auc{namespace=\"ml\",model=\"ctr\",version=\"ctr-v2\"})"
        );
        let mut custom = metric(None, None, Some(1.0));
        custom.query =
            Some("rate(x{version=\"{{canary}}\",ns=\"{{namespace}}\"}[{{interval}}])".into());
        assert_eq!(
            query(&custom, &context()),
            "rate(x{version=\"ctr-v2\",ns=\"ml\"}[60s])"
        );
    }

    #[test]
    fn every_builtin_and_the_alerts_are_scoped_to_the_rollouts_namespace() {
        let staging = QueryContext {
            namespace: "staging",
            ..context()
        };
        for builtin in [
            BuiltinMetric::AucDrop,
            BuiltinMetric::CalibrationDeviation,
            BuiltinMetric::LatencyP99,
            BuiltinMetric::ErrorRate,
        ] {
            let text = query(&metric(Some(builtin), None, Some(1.0)), &staging);
            let selectors = text.matches("model=\"ctr\"").count();
            assert!(selectors > 0, "{text}");
            assert_eq!(
                text.matches("namespace=\"staging\",model=\"ctr\"").count(),
                selectors,
                "{text}"
            );
        }
        assert!(samples_query(&staging).contains("namespace=\"staging\",model=\"ctr\""));
        assert_eq!(
            alert_query("FlywheelAucDrop", &staging),
            "count(ALERTS{alertstate=\"firing\",alertname=\"FlywheelAucDrop\",namespace=\"staging\",model=\"ctr\",version=~\"ctr-v2|\"})"
        );
    }

    #[test]
    fn only_evidence_fails_a_measurement() {
        let auc = metric(Some(BuiltinMetric::AucDrop), None, Some(0.005));
        let verdict =
            |result: QueryResult, samples: f64| judge(&auc, &result, Some(samples), 1000).verdict;
        assert_eq!(
            verdict(QueryResult::Value(0.02), 5000.0),
            MeasurementVerdict::Failed
        );
        assert_eq!(
            verdict(QueryResult::Value(0.001), 5000.0),
            MeasurementVerdict::Successful
        );
        assert_eq!(
            verdict(QueryResult::Value(0.02), 10.0),
            MeasurementVerdict::Inconclusive
        );
        assert_eq!(
            verdict(QueryResult::Value(f64::NAN), 5000.0),
            MeasurementVerdict::Inconclusive
        );
        assert_eq!(
            verdict(QueryResult::Empty, 5000.0),
            MeasurementVerdict::Inconclusive
        );
        assert_eq!(
            verdict(QueryResult::Error("down".into()), 5000.0),
            MeasurementVerdict::Error
        );
        let latency = metric(Some(BuiltinMetric::LatencyP99), None, Some(0.025));
        assert_eq!(
            judge(&latency, &QueryResult::Value(0.01), None, 1000).verdict,
            MeasurementVerdict::Successful,
            "latency needs no labels"
        );
        let failed = judge(&auc, &QueryResult::Value(0.02), Some(5000.0), 1000);
        assert_eq!(failed.message, "m = 0.02 > max 0.005");
    }

    #[test]
    fn answers_parse_to_a_value_nothing_or_an_error() {
        let vector = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"0.25"]}]}}"#;
        assert_eq!(parse_answer(vector).ok(), Some(QueryResult::Value(0.25)));
        let empty = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(parse_answer(empty).ok(), Some(QueryResult::Empty));
        let nan = br#"{"status":"success","data":{"resultType":"scalar","result":[1,"NaN"]}}"#;
        assert!(matches!(parse_answer(nan), Ok(QueryResult::Value(v)) if v.is_nan()));
        let bad = br#"{"status":"error","errorType":"bad_data","error":"parse error"}"#;
        assert_eq!(
            parse_answer(bad).ok(),
            Some(QueryResult::Error("parse error".into()))
        );
        assert_eq!(percent_encode("a b{c=\"d\"}"), "a%20b%7Bc%3D%22d%22%7D");
    }
}
