//! `flywheel-serving`: the online data plane a Rollout's pods run (serve, route, ingest).
//! Not built yet: this binary exists so the workspace, images and kubelet stand-in have their final names.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "flywheel-serving {}: no roles are implemented yet (serve, route, ingest)",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
