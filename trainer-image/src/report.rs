//! Where results go: JSON lines on stdout, and the termination message the operator reads.

use std::path::Path;

pub fn emit(event: serde_json::Value) {
    println!("{event}");
}

/// Best effort: outside Kubernetes the default path usually does not exist, and stdout already has the result.
pub fn write_termination_message(path: &Path, result: &serde_json::Value) {
    if let Err(err) = std::fs::write(path, result.to_string()) {
        eprintln!(
            "flywheel-trainer: not writing the termination message to {}: {err}",
            path.display()
        );
    }
}
