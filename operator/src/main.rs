//! The operator binary: probes and metrics, leader election, then the controllers until SIGTERM.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context as _, anyhow};
use clap::Parser;
use flywheel_operator::alerts::AlertBoard;
use flywheel_operator::config::Config;
use flywheel_operator::controller::Context;
use flywheel_operator::http::{self, Health};
use flywheel_operator::leader::{self, LeaderElector, LeaseSettings};
use flywheel_operator::metrics::Metrics;
use flywheel_operator::supervisor::{Shutdown, run_all};
use flywheel_operator::telemetry;
use futures::FutureExt;
use futures::channel::oneshot;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

#[tokio::main]
async fn main() -> ExitCode {
    let config = Config::parse();
    telemetry::init(config.log_format);
    match run(config).await {
        Ok(()) => {
            info!("operator stopped");
            ExitCode::SUCCESS
        }
        Err(err) => {
            error!(error = format!("{err:#}"), "operator failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let identity = config.identity();
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::new(metrics.clone()));
    let listener = http::bind(config.http_addr)
        .await
        .with_context(|| format!("binding {}", config.http_addr))?;
    info!(addr = %listener.local_addr()?, identity, "serving /metrics, /healthz, /readyz");
    let (stop_http, http_stopped) = oneshot::channel::<()>();
    let alerts = Arc::new(AlertBoard::default());
    // With leader election, a replica acts on alerts only once it leads.
    alerts.set_leading(config.no_leader_election);
    let http_server = tokio::spawn(http::serve(
        listener,
        health.clone(),
        alerts.clone(),
        http_stopped.map(|_| ()),
    ));

    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let stop_signal = async move {
        tokio::select! {
            _ = terminate.recv() => info!("SIGTERM received, shutting down"),
            _ = interrupt.recv() => info!("SIGINT received, shutting down"),
        }
    };
    tokio::pin!(stop_signal);

    let client = kube::Client::try_default()
        .await
        .context("building the Kubernetes client")?;
    alerts.set_token(webhook_token(&config, &client).await?);
    let ctx = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        &identity,
        config.trainer_settings(),
        config.serving_settings(),
        alerts,
    ));
    let pod = config.pod();
    let outcome = if config.no_leader_election {
        health.set_ready(true);
        if let Some((namespace, name)) = &pod {
            leader::mark_pod(&client, namespace, name, true).await;
        }
        let mut shutdown = Shutdown::default();
        let controllers = run_all(ctx, &mut shutdown);
        tokio::pin!(controllers);
        tokio::select! {
            () = &mut stop_signal => {
                shutdown.trigger();
                controllers.await;
                Ok(())
            }
            () = &mut controllers => Err(anyhow!("controllers stopped unexpectedly")),
        }
    } else {
        let elector = LeaderElector::new(
            client.clone(),
            LeaseSettings {
                name: config.lease_name.clone(),
                namespace: config.lease_namespace(),
                identity: identity.clone(),
                duration: config.lease_duration,
                retry: config.lease_retry,
            },
        );
        let marker = LeaderMark {
            client,
            pod,
            alerts: ctx.alerts.clone(),
        };
        lead(&elector, ctx, &health, &metrics, &marker, &mut stop_signal).await
    };
    let _ = stop_http.send(());
    http_server
        .await
        .context("joining the HTTP server")?
        .context("serving HTTP")?;
    outcome
}

/// The token Alertmanager's notifications must carry: from the file given, else from the operator's Secret
/// (created with a fresh token by whichever replica starts first).
async fn webhook_token(
    config: &Config,
    client: &kube::Client,
) -> anyhow::Result<flywheel_auth::Token> {
    if let Some(path) = &config.alertmanager_token_file {
        return flywheel_auth::Token::from_file(path).context("--alertmanager-token-file");
    }
    let namespace = config.lease_namespace();
    let secrets = kube::Api::namespaced(client.clone(), &namespace);
    let tokens = flywheel_operator::credentials::ensure(
        &secrets,
        &config.alertmanager_token_secret,
        None,
        serde_json::json!({"app.kubernetes.io/name": "flywheel", "flywheel.dev/role": "alertmanager-webhook"}),
        &[flywheel_auth::WEBHOOK_TOKEN_KEY],
    )
    .await
    .with_context(|| {
        format!(
            "the webhook token in Secret {namespace}/{}",
            config.alertmanager_token_secret
        )
    })?;
    tokens
        .get(flywheel_auth::WEBHOOK_TOKEN_KEY)
        .cloned()
        .ok_or_else(|| {
            anyhow!(
                "Secret {} has no webhook token",
                config.alertmanager_token_secret
            )
        })
}

/// Where this replica says whether it leads: its pod's label (the webhook Service follows it) and the alert
/// board (a standby refuses notifications).
struct LeaderMark {
    client: kube::Client,
    /// This replica's pod (namespace, name), when it runs in one.
    pod: Option<(String, String)>,
    alerts: Arc<AlertBoard>,
}

impl LeaderMark {
    async fn set(&self, leading: bool) {
        self.alerts.set_leading(leading);
        if let Some((namespace, name)) = &self.pod {
            leader::mark_pod(&self.client, namespace, name, leading).await;
        }
    }
}

/// Waits for the Lease, runs the controllers while holding it, and stops them on shutdown (releasing the Lease
/// so a standby takes over at once) or when the Lease is lost (exiting non-zero so the pod restarts as standby).
async fn lead(
    elector: &LeaderElector,
    ctx: Arc<Context>,
    health: &Health,
    metrics: &Metrics,
    marker: &LeaderMark,
    stop_signal: &mut (impl Future<Output = ()> + Unpin),
) -> anyhow::Result<()> {
    // A restarted container is the same pod: its label from before the restart must not draw notifications.
    marker.set(false).await;
    info!("waiting for the leader lease");
    tokio::select! {
        () = &mut *stop_signal => return Ok(()),
        () = elector.acquire(|| health.set_ready(true)) => {}
    }
    marker.set(true).await;
    metrics.set_leader(true);
    info!("leading: starting controllers");
    let mut shutdown = Shutdown::default();
    let controllers = run_all(ctx, &mut shutdown);
    tokio::pin!(controllers);
    let outcome = tokio::select! {
        () = &mut *stop_signal => {
            shutdown.trigger();
            // Keep renewing while the controllers drain: a Lease left alone meanwhile lapses, and the standby
            // would wait out a whole lease duration instead of taking the released Lease at once.
            tokio::select! {
                () = &mut controllers => {}
                () = elector.hold_until_lost() => controllers.await,
            }
            elector.release().await;
            Ok(())
        }
        () = elector.hold_until_lost() => {
            shutdown.trigger();
            controllers.await;
            Err(anyhow!("lost the leader lease"))
        }
        () = &mut controllers => Err(anyhow!("controllers stopped unexpectedly")),
    };
    metrics.set_leader(false);
    marker.set(false).await;
    outcome
}
