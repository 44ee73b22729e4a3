//! Command-line and environment configuration of the operator.

use flywheel_crds::common::parse_duration;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "flywheel-operator",
    version,
    about = "Runs the Flywheel ML lifecycle custom resources"
)]
pub struct Config {
    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "FLYWHEEL_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,

    /// Identity written into the leader Lease; defaults to the pod name, else hostname-pid.
    #[arg(long, env = "FLYWHEEL_IDENTITY")]
    pub identity: Option<String>,

    /// Namespace of the leader Lease; defaults to the pod's namespace, else `default`.
    #[arg(long, env = "FLYWHEEL_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,

    #[arg(long, env = "FLYWHEEL_LEASE_NAME", default_value = "flywheel-operator")]
    pub lease_name: String,

    /// How long a leader's Lease stays valid without renewal; a standby takes over after it lapses.
    #[arg(long, env = "FLYWHEEL_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// How often the leader renews, and a standby retries.
    #[arg(long, env = "FLYWHEEL_LEASE_RETRY", default_value = "2s", value_parser = parse_duration)]
    pub lease_retry: Duration,

    /// Skip leader election (a single replica, or local development).
    #[arg(long, env = "FLYWHEEL_NO_LEADER_ELECTION")]
    pub no_leader_election: bool,

    /// Image of training pods when a TrainingJob names none.
    #[arg(long, env = "FLYWHEEL_TRAINER_IMAGE")]
    pub trainer_image: Option<String>,

    /// Image of the workers of TrainingJobs that train on NVIDIA GPUs (data-parallel on `nvidia.com/…`) and name
    /// no image: the trainer built with `--features cuda`.
    #[arg(long, env = "FLYWHEEL_TRAINER_GPU_IMAGE")]
    pub trainer_gpu_image: Option<String>,

    /// PersistentVolumeClaim mounted into every training pod at `--storage-path`: where the `file://` URIs
    /// of data, checkpoints and artifacts live. Without it, pods see those paths on their node.
    #[arg(long, env = "FLYWHEEL_STORAGE_CLAIM")]
    pub storage_claim: Option<String>,

    #[arg(
        long,
        env = "FLYWHEEL_STORAGE_PATH",
        default_value = "/var/lib/flywheel"
    )]
    pub storage_path: String,

    /// ServiceAccount of training pods (they need no API access; its token is not mounted).
    #[arg(long, env = "FLYWHEEL_TRAINER_SERVICE_ACCOUNT")]
    pub trainer_service_account: Option<String>,

    /// Image of serving pods (`flywheel-serving`) when a Rollout names none.
    #[arg(long, env = "FLYWHEEL_SERVING_IMAGE")]
    pub serving_image: Option<String>,

    /// The Alertmanager webhook's token, from a file (a mounted Secret). Without it the operator keeps the
    /// token in the Secret `--alertmanager-token-secret` of its namespace, creating it on first start.
    #[arg(long, env = "FLYWHEEL_ALERTMANAGER_TOKEN_FILE")]
    pub alertmanager_token_file: Option<std::path::PathBuf>,

    #[arg(
        long,
        env = "FLYWHEEL_ALERTMANAGER_TOKEN_SECRET",
        default_value = "flywheel-alertmanager-webhook"
    )]
    pub alertmanager_token_secret: String,

    /// Log format: `json` (default, for log pipelines) or `text`.
    #[arg(long, env = "FLYWHEEL_LOG_FORMAT", default_value = "json")]
    pub log_format: LogFormat,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

impl Config {
    pub fn trainer_settings(&self) -> TrainerSettings {
        let defaults = TrainerSettings::default();
        TrainerSettings {
            image: self.trainer_image.clone().unwrap_or(defaults.image),
            gpu_image: self.trainer_gpu_image.clone().unwrap_or(defaults.gpu_image),
            storage_claim: self.storage_claim.clone(),
            storage_path: self.storage_path.clone(),
            service_account: self.trainer_service_account.clone(),
        }
    }

    pub fn serving_settings(&self) -> ServingSettings {
        ServingSettings {
            image: self.serving_image.clone().unwrap_or_else(|| {
                format!(
                    "ghcr.io/flywheel-dev/flywheel-serving:{}",
                    env!("CARGO_PKG_VERSION")
                )
            }),
            traffic_log_image: self.trainer_settings().image,
            storage_claim: self.storage_claim.clone(),
            storage_path: self.storage_path.clone(),
        }
    }

    /// This replica's pod (namespace, name), from the downward API the chart sets.
    pub fn pod(&self) -> Option<(String, String)> {
        let name = std::env::var("POD_NAME").ok()?;
        let namespace = std::env::var("POD_NAMESPACE").ok()?;
        Some((namespace, name))
    }

    pub fn identity(&self) -> String {
        if let Some(identity) = &self.identity {
            return identity.clone();
        }
        if let Ok(pod) = std::env::var("POD_NAME") {
            return pod;
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "flywheel".to_owned());
        format!("{host}-{}", std::process::id())
    }

    pub fn lease_namespace(&self) -> String {
        self.lease_namespace
            .clone()
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .or_else(|| {
                std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                    .ok()
                    .map(|ns| ns.trim().to_owned())
            })
            .unwrap_or_else(|| "default".to_owned())
    }
}

/// Operator-wide settings every gang uses.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerSettings {
    pub image: String,
    /// Image of the workers of a job that trains on NVIDIA GPUs (the trainer built with `--features cuda`).
    pub gpu_image: String,
    /// A PersistentVolumeClaim mounted at `storage_path` in every pod: where `file://` URIs of data,
    /// checkpoints and artifacts live.
    pub storage_claim: Option<String>,
    pub storage_path: String,
    pub service_account: Option<String>,
}

impl Default for TrainerSettings {
    fn default() -> Self {
        TrainerSettings {
            image: format!(
                "ghcr.io/flywheel-dev/flywheel-trainer:{}",
                env!("CARGO_PKG_VERSION")
            ),
            gpu_image: format!(
                "ghcr.io/flywheel-dev/flywheel-trainer:{}-cuda",
                env!("CARGO_PKG_VERSION")
            ),
            storage_claim: None,
            storage_path: "/var/lib/flywheel".to_owned(),
            service_account: None,
        }
    }
}

/// Settings every serving pod gets.
#[derive(Clone, Debug, PartialEq)]
pub struct ServingSettings {
    pub image: String,
    /// The trainer image, which runs a Rollout's traffic log (it writes the offline store's Parquet).
    pub traffic_log_image: String,
    /// The claim the artifacts are on (the trainer's storage), mounted read-only at `storage_path`.
    pub storage_claim: Option<String>,
    pub storage_path: String,
}
