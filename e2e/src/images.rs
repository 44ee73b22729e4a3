//! Flywheel's container images as `scripts/build-images.sh` tags them locally (and the chart names them by
//! default): what the real node's pods run.

/// The registry the images are tagged under without a registry of one's own: the chart's `image.registry`.
pub const DEFAULT_REGISTRY: &str = "ghcr.io/flywheel-dev";

/// `DEFAULT_REGISTRY/NAME:VERSION` for `flywheel-operator`, `flywheel-trainer` or `flywheel-serving`.
pub fn image(name: &str) -> String {
    format!("{DEFAULT_REGISTRY}/{name}:{}", env!("CARGO_PKG_VERSION"))
}
