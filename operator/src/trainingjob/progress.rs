//! Reads a running job's progress from its chief worker (`GET http://<pod IP>:7071/progress`), so pods need no
//! write access to the TrainingJob. Best effort: a chief that is starting, busy or gone yields `None` and the
//! status keeps the last progress it had.

use std::time::Duration;

use flywheel_crds::trainingjob::TrainingProgress;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;
use tracing::debug;

use super::gang::STATUS_PORT;

/// A chief that does not answer this fast is busy; the next poll will do.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The most of a `/progress` body the operator reads: a report is a few hundred bytes, and the pod is the job
/// author's, so an endless body must not take the operator's memory.
const MAX_REPORT_BYTES: usize = 64 << 10;

/// The chief's `/progress` body (trainer-image `status` module).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    step: u64,
    #[serde(default)]
    total_steps: Option<u64>,
    #[serde(default)]
    epoch: Option<u32>,
    #[serde(default)]
    loss: Option<f64>,
    #[serde(default)]
    samples_per_second: Option<f64>,
}

fn to_progress(report: Report) -> TrainingProgress {
    let percent = report
        .total_steps
        .filter(|total| *total > 0)
        .map(|total| format!("{}%", (report.step.min(total) * 100) / total));
    TrainingProgress {
        step: report.step,
        total_steps: report.total_steps,
        epoch: report.epoch,
        percent,
        samples_per_second: report.samples_per_second.filter(|v| v.is_finite()),
        loss: report.loss.filter(|v| v.is_finite()),
    }
}

/// Parses a `/progress` body.
pub fn parse(body: &[u8]) -> Option<TrainingProgress> {
    serde_json::from_slice::<Report>(body).ok().map(to_progress)
}

pub async fn poll(pod_ip: &str) -> Option<TrainingProgress> {
    let address = if pod_ip.contains(':') {
        format!("[{pod_ip}]:{STATUS_PORT}")
    } else {
        format!("{pod_ip}:{STATUS_PORT}")
    };
    match tokio::time::timeout(TIMEOUT, fetch(&address)).await {
        Ok(Ok(body)) => parse(&body),
        Ok(Err(err)) => {
            debug!(pod_ip, error = %err, "progress not available");
            None
        }
        Err(_) => None,
    }
}

async fn fetch(address: &str) -> Result<Bytes, Box<dyn std::error::Error + Send + Sync>> {
    let stream = TcpStream::connect(address).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(connection);
    let request = hyper::Request::get("/progress")
        .header(hyper::header::HOST, address)
        .body(Empty::<Bytes>::new())?;
    let response = sender.send_request(request).await?;
    if !response.status().is_success() {
        driver.abort();
        return Err(format!("status {}", response.status()).into());
    }
    let body = Limited::new(response.into_body(), MAX_REPORT_BYTES)
        .collect()
        .await;
    driver.abort();
    Ok(body?.to_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_progress_body_parses_or_is_ignored(body in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = parse(&body);
        }

        #[test]
        fn any_json_progress_parses_or_is_ignored(
            epoch in any::<i64>(), step in any::<f64>(), loss in prop::option::of(any::<f64>()),
            extra in "[a-z]{0,8}",
        ) {
            let body = serde_json::json!({"epoch": epoch, "step": step, "loss": loss, extra: [1, {"x": null}]});
            let _ = parse(body.to_string().as_bytes());
        }
    }

    #[tokio::test]
    async fn an_endless_progress_body_is_cut_off() {
        let address = crate::hostile_server::endless()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let result = tokio::time::timeout(Duration::from_secs(30), fetch(&address.to_string()))
            .await
            .unwrap_or_else(|_| panic!("the read was not cut off"));
        let error = result.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("length limit"), "{error}");
    }

    #[test]
    fn a_report_becomes_progress_with_a_percentage() {
        let progress = parse(
            br#"{"step":250,"totalSteps":1000,"epoch":1,"loss":0.45,"samplesPerSecond":70000.5,"phase":"training"}"#,
        );
        assert_eq!(
            progress,
            Some(TrainingProgress {
                step: 250,
                total_steps: Some(1000),
                epoch: Some(1),
                percent: Some("25%".into()),
                samples_per_second: Some(70000.5),
                loss: Some(0.45),
            })
        );
    }

    #[test]
    fn a_report_before_the_first_step_has_no_loss() {
        let progress = parse(br#"{"step":0,"totalSteps":0,"epoch":0,"loss":null,"samplesPerSecond":null,"phase":"loading"}"#);
        assert_eq!(
            progress.map(|p| (p.step, p.percent, p.loss)),
            Some((0, None, None))
        );
        assert_eq!(parse(b"not json"), None);
    }
}
