//! The batch side of a FeatureView: `materialize` (source events → offline feature table + online store),
//! `build-dataset` (point-in-time correct training sets, sample joining) and `generate-events` (synthetic
//! feature events for demos and benchmarks).

mod build_dataset;
mod generate_events;
mod materialize;

use std::path::PathBuf;

use anyhow::{Context, bail};
use flywheel_crds::FeatureView;
use flywheel_crds::common::parse_duration;
use flywheel_features::view::Micros;

pub use build_dataset::{BuildDatasetArgs, SampleJoin, build_dataset};
pub use generate_events::{GenerateEventsArgs, generate_events};
pub use materialize::{MaterializeArgs, materialize};

#[derive(clap::Args, Clone)]
pub struct ViewArgs {
    /// The FeatureView manifest (YAML or JSON).
    #[arg(long, env = "FLYWHEEL_FEATURE_VIEW_FILE")]
    view: Option<PathBuf>,
    /// The FeatureView as JSON (the operator passes it so).
    #[arg(
        long,
        env = "FLYWHEEL_FEATURE_VIEW",
        hide_env_values = true,
        conflicts_with = "view"
    )]
    view_json: Option<String>,
}

pub fn load_view(args: &ViewArgs) -> anyhow::Result<FeatureView> {
    let text = match (&args.view, &args.view_json) {
        (Some(path), _) => std::fs::read_to_string(path)
            .with_context(|| format!("reading the FeatureView {}", path.display()))?,
        (None, Some(json)) => json.clone(),
        (None, None) => bail!("give the FeatureView with --view FILE or FLYWHEEL_FEATURE_VIEW"),
    };
    Ok(flywheel_features::view::parse_manifest(&text)?)
}

/// A local path from a storage URI: `file://` URIs and plain paths. Object stores are not read by this build.
fn local_path(uri: &str) -> anyhow::Result<PathBuf> {
    if let Some(path) = uri.strip_prefix("file://") {
        return Ok(PathBuf::from(path));
    }
    if let Some((scheme, _)) = uri.split_once("://") {
        bail!(
            "{uri}: {scheme}:// is not readable by this build; mount the bucket and give a file:// URI"
        );
    }
    Ok(PathBuf::from(uri))
}

fn parse_time(text: &str, flag: &str) -> anyhow::Result<Micros> {
    let time: jiff::Timestamp = text
        .parse()
        .with_context(|| format!("{flag} `{text}` is not an RFC 3339 time"))?;
    Ok(time.as_microsecond())
}

fn format_time(micros: Micros) -> String {
    jiff::Timestamp::from_microsecond(micros).map_or_else(|_| micros.to_string(), |t| t.to_string())
}

fn micros_of(text: &str, flag: &str) -> anyhow::Result<Micros> {
    let duration = parse_duration(text).with_context(|| format!("{flag} `{text}`"))?;
    i64::try_from(duration.as_micros()).with_context(|| format!("{flag} `{text}` is too long"))
}
