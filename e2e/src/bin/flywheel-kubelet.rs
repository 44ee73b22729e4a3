//! Plays the kubelet for a local control plane (see `flywheel_e2e::kubelet`), for the demo.
//!
//! Usage: `flywheel-kubelet [BIN_DIR [WORK_DIR]] [--capacity RESOURCE=COUNT]...`, e.g.
//! `--capacity nvidia.com/gpu=8 --capacity nvidia.com/mig-1g.10gb=14` for a node with GPUs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context, bail};
use flywheel_e2e::kubelet::{Kubelet, parse_capacity};

const USAGE: &str = "usage: flywheel-kubelet [BIN_DIR [WORK_DIR]] [--capacity RESOURCE=COUNT]...";

/// What the command line asks for.
struct Options {
    bin_dir: PathBuf,
    work_dir: PathBuf,
    capacity: BTreeMap<String, u64>,
}

fn parse_options(args: impl IntoIterator<Item = String>) -> anyhow::Result<Options> {
    let mut positional = Vec::new();
    let mut capacity = BTreeMap::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let resource = if arg == "--capacity" {
            args.next()
                .with_context(|| format!("--capacity needs RESOURCE=COUNT\n{USAGE}"))?
        } else if let Some(resource) = arg.strip_prefix("--capacity=") {
            resource.to_owned()
        } else if arg == "--help" || arg == "-h" {
            println!("{USAGE}");
            std::process::exit(0);
        } else if arg.starts_with('-') {
            bail!("unknown option {arg}\n{USAGE}");
        } else {
            positional.push(arg);
            continue;
        };
        let (name, count) = parse_capacity(&resource)
            .map_err(|err| anyhow::anyhow!("--capacity {err}\n{USAGE}"))?;
        if capacity.insert(name.clone(), count).is_some() {
            bail!("--capacity {name} is given twice\n{USAGE}");
        }
    }
    if positional.len() > 2 {
        bail!("too many arguments\n{USAGE}");
    }
    let mut positional = positional.into_iter().map(PathBuf::from);
    Ok(Options {
        bin_dir: positional.next().unwrap_or_else(flywheel_e2e::bin_dir),
        work_dir: positional
            .next()
            .unwrap_or_else(|| std::env::temp_dir().join("flywheel-kubelet")),
        capacity,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info,kube=warn"))
        .init();
    let options = parse_options(std::env::args().skip(1))?;
    let client = kube::Client::try_default()
        .await
        .context("building the Kubernetes client from KUBECONFIG")?;
    Kubelet::new(client, options.bin_dir, options.work_dir)
        .with_capacity(options.capacity)
        .run()
        .await
        .context("running the kubelet stand-in")
}
