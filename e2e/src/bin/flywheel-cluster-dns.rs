//! Keeps the local node's cluster DNS records: watches Services and Endpoints and rewrites
//! `HOSTS_DIR/cluster.hosts` (served by dnsmasq) whenever the records change.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use flywheel_e2e::node_dns::{hosts_file, write_atomically};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client, Config};

#[derive(Parser)]
struct Args {
    /// Kubeconfig of the cluster whose records to serve.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Directory dnsmasq reads hosts files from (`--hostsdir`).
    #[arg(long)]
    hosts_dir: PathBuf,
    #[arg(long, default_value = "cluster.local")]
    domain: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let kubeconfig = Kubeconfig::read_from(&args.kubeconfig).context("reading the kubeconfig")?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    let client = Client::try_from(config)?;

    let (services, services_writer) = reflector::store::<Service>();
    let (endpoints, endpoints_writer) = reflector::store::<Endpoints>();
    let service_events = reflector(
        services_writer,
        watcher(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
        ),
    )
    .default_backoff()
    .map(|event| event.map(|_| ()).map_err(anyhow::Error::from));
    let endpoint_events = reflector(
        endpoints_writer,
        watcher(Api::<Endpoints>::all(client), watcher::Config::default()),
    )
    .default_backoff()
    .map(|event| event.map(|_| ()).map_err(anyhow::Error::from));
    let mut events = std::pin::pin!(futures::stream::select(service_events, endpoint_events));

    let path = args.hosts_dir.join("cluster.hosts");
    let mut written = None;
    while let Some(event) = events.next().await {
        if let Err(err) = event {
            tracing::warn!("watch: {err:#}");
            continue;
        }
        let services = services.state();
        let endpoints = endpoints.state();
        let contents = hosts_file(
            services.iter().map(AsRef::as_ref),
            endpoints.iter().map(AsRef::as_ref),
            &args.domain,
        );
        if written.as_ref() != Some(&contents) {
            write_atomically(&path, &contents)
                .with_context(|| format!("writing {}", path.display()))?;
            written = Some(contents);
        }
    }
    Ok(())
}
