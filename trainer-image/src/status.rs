//! Training progress: every rank reports it as JSON lines on stdout, and the chief (rank 0) also serves its
//! latest report at `GET /progress` (`--status-listen`), so the operator can show a TrainingJob's live progress
//! by polling `http://<chief pod IP>:7071/progress` instead of the pods writing to the Kubernetes API.
//!
//! The endpoint serves exactly what the last `progress` line said, so the log and the endpoint never disagree.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use serde_json::json;
use tokio::runtime::Runtime;
use tokio::sync::watch;

/// What a run is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Reading data, resuming, connecting to peers: no step trained yet.
    Loading,
    Training,
    /// Training is over (every worker's, in a gang); the model is being evaluated and written.
    Evaluating,
    Done,
}

/// The latest progress report, as `GET /progress` returns it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u32,
    pub loss: Option<f64>,
    pub samples_per_second: Option<f64>,
    pub phase: Phase,
}

impl Progress {
    fn loading() -> Self {
        Progress {
            step: 0,
            total_steps: 0,
            epoch: 0,
            loss: None,
            samples_per_second: None,
            phase: Phase::Loading,
        }
    }
}

/// Reports a worker's progress: the first step it trains, then every `every` steps and the last step. The
/// throughput is over the steps since the previous report, so it follows the current speed.
pub struct ProgressReporter {
    rank: u32,
    every: u64,
    latest: watch::Sender<Progress>,
    reported_any: bool,
    window_samples: usize,
    window_started: Instant,
    /// Runs the endpoint, when there is one; dropping it stops serving.
    _endpoint: Option<Runtime>,
}

impl ProgressReporter {
    /// A reporter for worker `rank`, serving its reports on `listen` when given.
    pub fn start(rank: u32, every: u64, listen: Option<SocketAddr>) -> anyhow::Result<Self> {
        let (latest, reader) = watch::channel(Progress::loading());
        let endpoint = listen.map(|addr| serve(addr, reader)).transpose()?;
        Ok(ProgressReporter {
            rank,
            every: every.max(1),
            latest,
            reported_any: false,
            window_samples: 0,
            window_started: Instant::now(),
            _endpoint: endpoint,
        })
    }

    /// Records a trained step of `samples` examples (`step` counts from 1, up to `total_steps`), reporting it
    /// when one is due.
    pub fn record_step(
        &mut self,
        epoch: usize,
        step: u64,
        total_steps: u64,
        samples: usize,
        loss: f64,
    ) {
        self.window_samples += samples;
        let due = !self.reported_any || step.is_multiple_of(self.every) || step == total_steps;
        if !due {
            return;
        }
        let seconds = self.window_started.elapsed().as_secs_f64().max(1e-9);
        let progress = Progress {
            step,
            total_steps,
            epoch: u32::try_from(epoch).unwrap_or(u32::MAX),
            loss: Some(loss),
            samples_per_second: Some(self.window_samples as f64 / seconds),
            phase: Phase::Training,
        };
        crate::report::emit(json!({
            "event": "progress", "rank": self.rank, "epoch": progress.epoch, "step": progress.step,
            "totalSteps": progress.total_steps, "samplesPerSecond": progress.samples_per_second,
            "loss": progress.loss,
        }));
        self.latest.send_replace(progress);
        self.reported_any = true;
        self.window_samples = 0;
        self.window_started = Instant::now();
    }

    /// Moves to `phase`, keeping the last step's figures.
    pub fn phase(&self, phase: Phase) {
        self.latest.send_modify(|progress| progress.phase = phase);
    }
}

/// Serves `GET /progress` on `addr` from a runtime of its own: training blocks the calling thread between
/// reports, and the endpoint must answer meanwhile.
fn serve(addr: SocketAddr, latest: watch::Receiver<Progress>) -> anyhow::Result<Runtime> {
    // One thread is plenty for a poll every few seconds, and leaves the cores to training.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("status-endpoint")
        .enable_all()
        .build()
        .context("starting the status endpoint's runtime")?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(addr))
        .with_context(|| format!("binding the status endpoint {addr}"))?;
    let bound = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    crate::report::emit(json!({"event": "statusListening", "addr": bound, "path": "/progress"}));
    let app = Router::new()
        .route("/progress", get(latest_progress))
        .with_state(latest);
    runtime.spawn(async move {
        // Losing the endpoint only blinds the operator's progress display: training goes on.
        if let Err(err) = axum::serve(listener, app).await {
            eprintln!("flywheel-trainer: the status endpoint stopped: {err}");
        }
    });
    Ok(runtime)
}

async fn latest_progress(State(latest): State<watch::Receiver<Progress>>) -> Response {
    let body = serde_json::to_string(&*latest.borrow());
    match body {
        Ok(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response(),
        Err(err) => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn before_the_first_step_the_report_says_loading() {
        let body = serde_json::to_value(Progress::loading()).unwrap_or_default();
        assert_eq!(
            body,
            json!({"step": 0, "totalSteps": 0, "epoch": 0, "loss": null, "samplesPerSecond": null,
                   "phase": "loading"})
        );
    }

    #[test]
    fn reports_the_first_step_every_nth_and_the_last() {
        let Ok(mut reporter) = ProgressReporter::start(0, 3, None) else {
            panic!("a reporter without an endpoint always starts");
        };
        let mut reader = reporter.latest.subscribe();
        let mut reported = Vec::new();
        for step in 1..=7 {
            reporter.record_step(0, step, 7, 10, 0.5);
            if reader.has_changed().unwrap_or(false) {
                reported.push(reader.borrow_and_update().step);
            }
        }
        assert_eq!(reported, [1, 3, 6, 7]);
        reporter.phase(Phase::Evaluating);
        let latest = reader.borrow().clone();
        assert_eq!((latest.step, latest.phase), (7, Phase::Evaluating));
        assert!(latest.samples_per_second.is_some_and(|rate| rate > 0.0));
    }
}
