//! Plays the kubelet for a local control plane (see `flywheel_e2e::kubelet`), for the demo.

use std::path::PathBuf;

use anyhow::Context;
use flywheel_e2e::kubelet::Kubelet;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info,kube=warn"))
        .init();
    let mut args = std::env::args().skip(1);
    let bin_dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(flywheel_e2e::bin_dir);
    let work_dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("flywheel-kubelet"));
    let client = kube::Client::try_default()
        .await
        .context("building the Kubernetes client from KUBECONFIG")?;
    Kubelet::new(client, bin_dir, work_dir)
        .run()
        .await
        .context("running the kubelet stand-in")
}
