//! `flywheel-trainer`: the batch data plane a TrainingJob's pods run (train, ps, materialize, build-dataset).
//! Not built yet: this binary exists so the workspace, images and kubelet stand-in have their final names.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!(
        "flywheel-trainer {}: no roles are implemented yet (train, ps, materialize, build-dataset)",
        env!("CARGO_PKG_VERSION")
    );
    ExitCode::from(2)
}
