//! Writes the CustomResourceDefinitions of every Flywheel kind as YAML: `crds/<plural>.yaml` and the Helm
//! chart's copy under `charts/flywheel/crds/`. `crdgen --check` exits non-zero when a committed file is stale.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

fn main() -> ExitCode {
    let check = std::env::args().any(|arg| arg == "--check");
    let root = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| env!("CARGO_MANIFEST_DIR").into()),
    )
    .join("..");
    let targets = [root.join("crds"), root.join("charts/flywheel/crds")];
    let mut stale = Vec::new();
    for crd in flywheel_crds::all_crds() {
        let file_name = format!("{}.yaml", crd.name);
        let rendered = match flywheel_crds::render_crd_yaml(&crd.definition) {
            Ok(rendered) => rendered,
            Err(err) => {
                eprintln!("crdgen: cannot render {}: {err}", crd.name);
                return ExitCode::FAILURE;
            }
        };
        for dir in &targets {
            let path = dir.join(&file_name);
            if check {
                if std::fs::read_to_string(&path).ok().as_deref() != Some(rendered.as_str()) {
                    stale.push(path);
                }
            } else if let Err(err) = write(&path, &rendered) {
                eprintln!("crdgen: cannot write {}: {err}", path.display());
                return ExitCode::FAILURE;
            }
        }
    }
    if stale.is_empty() {
        return ExitCode::SUCCESS;
    }
    for path in stale {
        eprintln!(
            "stale: {} (run `cargo run -p flywheel-crds --bin crdgen`)",
            path.display()
        );
    }
    ExitCode::FAILURE
}

fn write(path: &Path, contents: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, contents)
}
