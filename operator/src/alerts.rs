//! The Alertmanager webhook receiver: firing alerts about a Rollout (labels `namespace` and `rollout`, or
//! `model` as the serving metrics carry it) are remembered and wake that Rollout's reconcile at once, so an abort
//! does not wait for the next analysis interval. A notification must carry the webhook token (Alertmanager's
//! `http_config.authorization` as a bearer token, or `basic_auth` with the token as the password); an alert
//! counts until it is resolved or its `endsAt` passes. Only the leader is Ready, so the Service delivers every
//! notification to the replica that acts on it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use flywheel_auth::Token;
use jiff::Timestamp;
use serde::Deserialize;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// A Rollout, by namespace and name.
pub type RolloutKey = (String, String);

/// Firing alerts by name and the model version they are about (`None`: the whole Rollout), each with the time
/// it ends by itself (`None`: when resolved).
type Firing = BTreeMap<(String, Option<String>), Option<Timestamp>>;

pub struct AlertBoard {
    firing: Mutex<HashMap<RolloutKey, Firing>>,
    wake: UnboundedSender<RolloutKey>,
    woken: Mutex<Option<UnboundedReceiver<RolloutKey>>>,
    /// The token notifications must carry; until it is known (start-up) notifications are refused.
    token: OnceLock<Token>,
    /// Whether this replica acts on alerts. A standby refuses notifications (503) so Alertmanager retries
    /// them, and the retry reaches the leader, instead of recording alerts nobody acts on.
    leading: AtomicBool,
}

impl Default for AlertBoard {
    fn default() -> Self {
        let (wake, woken) = unbounded_channel();
        AlertBoard {
            firing: Mutex::new(HashMap::new()),
            wake,
            woken: Mutex::new(Some(woken)),
            token: OnceLock::new(),
            leading: AtomicBool::new(true),
        }
    }
}

impl AlertBoard {
    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::Relaxed);
    }

    /// Sets the webhook token (once; a later call changes nothing and returns false).
    pub fn set_token(&self, token: Token) -> bool {
        self.token.set(token).is_ok()
    }

    /// Alert names firing for a Rollout at `now`, as last reported. An alert about one model version (a
    /// `version` label) counts only when that version is the `canary`: the stable version's trouble is no
    /// reason to roll a canary back.
    pub fn firing(&self, key: &RolloutKey, now: Timestamp, canary: Option<&str>) -> Vec<String> {
        let mut names: Vec<String> = self
            .lock()
            .get(key)
            .map(|alerts| {
                alerts
                    .iter()
                    .filter(|(_, ends)| ends.is_none_or(|ends| ends > now))
                    .filter(|((_, version), _)| version.is_none() || version.as_deref() == canary)
                    .map(|((name, _), _)| name.clone())
                    .collect()
            })
            .unwrap_or_default();
        names.dedup();
        names
    }

    /// The Rollouts to reconcile when alerts about them arrive (taken once, by the Rollout controller).
    pub fn take_wakeups(&self) -> Option<UnboundedReceiver<RolloutKey>> {
        self.woken
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RolloutKey, Firing>> {
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
            let alerts = firing.entry(key.clone()).or_default();
            let alert_key = (name.clone(), labels.get("version").cloned());
            if alert.status == "firing" {
                // Alertmanager sends the zero time (year 1) for an alert with no end yet.
                let ends = alert.ends_at.filter(|ends| *ends > Timestamp::UNIX_EPOCH);
                alerts.insert(alert_key, ends);
            } else {
                alerts.remove(&alert_key);
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
#[serde(rename_all = "camelCase")]
pub struct Alert {
    pub status: String,
    #[serde(default)]
    pub labels: HashMap<String, String>,
    #[serde(default)]
    pub ends_at: Option<Timestamp>,
}

pub fn router(board: Arc<AlertBoard>) -> Router {
    Router::new()
        .route("/webhook/alertmanager", post(receive))
        .with_state(board)
}

async fn receive(
    State(board): State<Arc<AlertBoard>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let authorization = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    match board.token.get() {
        None => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "the webhook token is not loaded yet",
            )
                .into_response();
        }
        Some(token) if !token.authorizes(authorization) => {
            tracing::warn!("alert notification without the webhook token refused");
            return (
                StatusCode::UNAUTHORIZED,
                "the webhook needs the token of the operator's webhook Secret (bearer, or basic auth password)",
            )
                .into_response();
        }
        Some(_) => {}
    }
    if !board.leading.load(Ordering::Relaxed) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "this replica is a standby; the leader acts on alerts (Alertmanager retries)",
        )
            .into_response();
    }
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
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_notification_body_is_taken_or_refused(body in prop::collection::vec(any::<u8>(), 0..2048)) {
            let board = AlertBoard::default();
            if let Ok(notification) = serde_json::from_slice::<Notification>(&body) {
                board.receive(&notification);
            }
        }

        #[test]
        fn any_alert_shape_updates_the_board_without_panicking(
            status in prop::sample::select(vec!["firing", "resolved", "", "other"]),
            labels in prop::collection::btree_map("[a-z]{0,10}", "[a-z0-9]{0,10}", 0..5),
            ends_at in prop::sample::select(vec![
                serde_json::json!("0001-01-01T00:00:00Z"), serde_json::json!("9999-12-31T23:59:59Z"),
                serde_json::json!("not a time"), serde_json::json!(12), serde_json::json!(null),
            ]),
        ) {
            let board = AlertBoard::default();
            let body = serde_json::json!({"alerts": [{"status": status, "labels": labels, "endsAt": ends_at}]});
            if let Ok(notification) = serde_json::from_value::<Notification>(body) {
                board.receive(&notification);
            }
        }
    }

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
        let now = Timestamp::UNIX_EPOCH + jiff::SignedDuration::from_hours(500_000);
        assert_eq!(board.receive(&notification), vec![key.clone()]);
        assert_eq!(
            board.firing(&key, now, None),
            vec!["FlywheelCalibrationDeviation"]
        );
        assert_eq!(woken.try_recv().ok(), Some(key.clone()));
        let resolved: Notification = serde_json::from_value(serde_json::json!({
            "alerts": [{"status": "resolved", "labels": {"alertname": "FlywheelCalibrationDeviation", "namespace": "ml", "rollout": "ctr"}}]
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        board.receive(&resolved);
        assert!(board.firing(&key, now, None).is_empty());
    }

    #[test]
    fn an_alert_ends_by_itself_at_its_ends_at_and_the_zero_time_means_no_end() {
        let board = AlertBoard::default();
        let notification: Notification = serde_json::from_value(serde_json::json!({
            "alerts": [
                {"status": "firing", "endsAt": "2027-01-01T00:10:00Z",
                 "labels": {"alertname": "Ends", "namespace": "ml", "rollout": "ctr"}},
                {"status": "firing", "endsAt": "0001-01-01T00:00:00Z",
                 "labels": {"alertname": "Open", "namespace": "ml", "rollout": "ctr"}},
            ]
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        board.receive(&notification);
        let key = ("ml".to_owned(), "ctr".to_owned());
        let at = |time: &str| time.parse::<Timestamp>().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            board.firing(&key, at("2027-01-01T00:09:59Z"), None),
            ["Ends", "Open"]
        );
        assert_eq!(
            board.firing(&key, at("2027-01-01T00:10:00Z"), None),
            ["Open"]
        );
    }

    #[test]
    fn an_alert_about_one_version_counts_only_for_that_canary() {
        let board = AlertBoard::default();
        let notification: Notification = serde_json::from_value(serde_json::json!({
            "alerts": [{"status": "firing", "labels": {
                "alertname": "FlywheelCalibrationDeviation", "namespace": "ml", "model": "ctr", "version": "ctr-v1",
            }}]
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        board.receive(&notification);
        let key = ("ml".to_owned(), "ctr".to_owned());
        let now = Timestamp::UNIX_EPOCH;
        assert!(
            board.firing(&key, now, Some("ctr-v2")).is_empty(),
            "the stable version's alert"
        );
        assert_eq!(
            board.firing(&key, now, Some("ctr-v1")),
            ["FlywheelCalibrationDeviation"]
        );
    }

    #[tokio::test]
    async fn a_notification_without_the_token_changes_nothing() {
        use tower::ServiceExt;
        let board = Arc::new(AlertBoard::default());
        let body = serde_json::json!({"alerts": [{"status": "firing", "labels": {"alertname": "A", "namespace": "ml", "rollout": "ctr"}}]}).to_string();
        let send = |authorization: Option<String>| {
            let (board, body) = (board.clone(), body.clone());
            async move {
                let mut request = axum::http::Request::post("/webhook/alertmanager");
                if let Some(value) = authorization {
                    request = request.header("authorization", value);
                }
                let request = request
                    .body(axum::body::Body::from(body))
                    .unwrap_or_else(|e| panic!("{e}"));
                router(board)
                    .oneshot(request)
                    .await
                    .map(|response| response.status())
                    .unwrap_or_else(|e| match e {})
            }
        };
        assert_eq!(send(None).await, StatusCode::SERVICE_UNAVAILABLE);
        let token = Token::generate().unwrap_or_else(|e| panic!("{e}"));
        assert!(board.set_token(token.clone()));
        let key = ("ml".to_owned(), "ctr".to_owned());
        let now = Timestamp::UNIX_EPOCH;
        for refused in [None, Some("Bearer not-the-token-at-all".to_owned())] {
            assert_eq!(send(refused).await, StatusCode::UNAUTHORIZED);
            assert!(board.firing(&key, now, None).is_empty());
        }
        board.set_leading(false);
        assert_eq!(
            send(Some(token.bearer())).await,
            StatusCode::SERVICE_UNAVAILABLE,
            "a standby refuses, so Alertmanager retries and reaches the leader"
        );
        assert!(board.firing(&key, now, None).is_empty());
        board.set_leading(true);
        assert_eq!(send(Some(token.bearer())).await, StatusCode::OK);
        assert_eq!(board.firing(&key, now, None), ["A"]);
    }
}
