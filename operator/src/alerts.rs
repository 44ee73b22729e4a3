//! The Alertmanager webhook receiver: firing alerts about a Rollout (labels `namespace` and `rollout`, or
//! `model` as the serving metrics carry it) are remembered and wake that Rollout's reconcile at once, so an abort
//! does not wait for the next analysis interval.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// A Rollout, by namespace and name.
pub type RolloutKey = (String, String);

pub struct AlertBoard {
    firing: Mutex<HashMap<RolloutKey, BTreeSet<String>>>,
    wake: UnboundedSender<RolloutKey>,
    woken: Mutex<Option<UnboundedReceiver<RolloutKey>>>,
}

impl Default for AlertBoard {
    fn default() -> Self {
        let (wake, woken) = unbounded_channel();
        AlertBoard {
            firing: Mutex::new(HashMap::new()),
            wake,
            woken: Mutex::new(Some(woken)),
        }
    }
}

impl AlertBoard {
    /// Alert names firing for a Rollout, as last reported.
    pub fn firing(&self, key: &RolloutKey) -> Vec<String> {
        self.lock()
            .get(key)
            .map(|names| names.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The Rollouts to reconcile when alerts about them arrive (taken once, by the Rollout controller).
    pub fn take_wakeups(&self) -> Option<UnboundedReceiver<RolloutKey>> {
        self.woken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RolloutKey, BTreeSet<String>>> {
        self.firing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies one notification; returns the Rollouts it concerns.
    pub fn receive(&self, notification: &Notification) -> Vec<RolloutKey> {
        let mut touched = Vec::new();
        let mut firing = self.lock();
        for alert in &notification.alerts {
            let labels = &alert.labels;
            let (Some(namespace), Some(rollout), Some(name)) = (
                labels.get("namespace"),
                labels.get("rollout").or_else(|| labels.get("model")),
                labels.get("alertname"),
            ) else {
                continue;
            };
            let key = (namespace.clone(), rollout.clone());
            let names = firing.entry(key.clone()).or_default();
            if alert.status == "firing" {
                names.insert(name.clone());
            } else {
                names.remove(name);
            }
            if !touched.contains(&key) {
                touched.push(key);
            }
        }
        drop(firing);
        for key in &touched {
            // The receiver lives as long as the Rollout controller; without it there is nobody to wake.
            let _ = self.wake.send(key.clone());
        }
        touched
    }
}

/// Alertmanager's webhook payload (version 4), the parts used here.
#[derive(Deserialize, Debug)]
pub struct Notification {
    #[serde(default)]
    pub alerts: Vec<Alert>,
}

#[derive(Deserialize, Debug)]
pub struct Alert {
    pub status: String,
    #[serde(default)]
    pub labels: HashMap<String, String>,
}

pub fn router(board: Arc<AlertBoard>) -> Router {
    Router::new()
        .route("/webhook/alertmanager", post(receive))
        .with_state(board)
}

async fn receive(State(board): State<Arc<AlertBoard>>, body: Bytes) -> Response {
    match serde_json::from_slice::<Notification>(&body) {
        Ok(notification) => {
            let touched = board.receive(&notification);
            tracing::info!(rollouts = touched.len(), "alert notification received");
            StatusCode::OK.into_response()
        }
        Err(err) => (
            StatusCode::BAD_REQUEST,
            format!("not an Alertmanager webhook payload: {err}"),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firing_and_resolved_alerts_update_the_board_and_wake_the_rollout() {
        let board = AlertBoard::default();
        let mut woken = board
            .take_wakeups()
            .unwrap_or_else(|| panic!("taken twice"));
        let notification: Notification = serde_json::from_value(serde_json::json!({
            "version": "4",
            "alerts": [
                {"status": "firing", "labels": {"alertname": "FlywheelCalibrationDeviation", "namespace": "ml", "model": "ctr"}},
                {"status": "firing", "labels": {"alertname": "Unrelated"}},
            ]
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let key = ("ml".to_owned(), "ctr".to_owned());
        assert_eq!(board.receive(&notification), vec![key.clone()]);
        assert_eq!(board.firing(&key), vec!["FlywheelCalibrationDeviation"]);
        assert_eq!(woken.try_recv().ok(), Some(key.clone()));
        let resolved: Notification = serde_json::from_value(serde_json::json!({
            "alerts": [{"status": "resolved", "labels": {"alertname": "FlywheelCalibrationDeviation", "namespace": "ml", "rollout": "ctr"}}]
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        board.receive(&resolved);
        assert!(board.firing(&key).is_empty());
    }
}
