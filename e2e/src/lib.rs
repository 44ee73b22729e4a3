//! Test harness against a real Kubernetes: a fresh local control plane per test binary and, for the tests
//! that run pods, a real node (kubelet, Docker, kube-proxy, cluster DNS) running Flywheel's built images with
//! the operator installed by its chart.

pub mod cluster;
pub mod fixtures;
pub mod helm;
pub mod http;
pub mod images;
pub mod node_dns;
pub mod on_node;
pub mod operator;
pub mod prometheus;
pub mod rollouts;
pub mod secured_stores;
pub mod serving;
pub mod training_jobs;
pub mod wait;

use std::path::PathBuf;

/// Directory of the workspace's built binaries (`flywheel-operator`, `flywheel-trainer`, …): `FLYWHEEL_BIN_DIR`,
/// else the profile directory the running test binary was built into.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLYWHEEL_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test binary> → target/<profile>
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Root of the repository (for scripts, examples and CRDs). Cargo's run-time value comes first: a binary
/// reused from a shared target dir may have been compiled in another checkout.
pub fn repo_root() -> PathBuf {
    PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("..")
}
