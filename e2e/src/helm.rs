//! Helm's own engine (`e2e/scripts/helm.py`, the helm-sdkpy wheel), as a user's `helm` would install the chart.

use std::process::Command;

use crate::repo_root;

#[derive(Debug, thiserror::Error)]
pub enum HelmError {
    #[error("running helm.py: {0}")]
    Spawn(#[from] std::io::Error),
    #[error("helm {args:?} failed:\n{output}")]
    Failed { args: Vec<String>, output: String },
}

/// Runs `helm.py ARGS` (`lint CHART`, `install RELEASE CHART NAMESPACE KUBECONFIG [k=v …]`,
/// `uninstall RELEASE NAMESPACE KUBECONFIG`) and returns its output.
pub fn helm(args: &[&str]) -> Result<String, HelmError> {
    let output = Command::new("python3")
        .arg(repo_root().join("e2e/scripts/helm.py"))
        .args(args)
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(HelmError::Failed {
            args: args.iter().map(|arg| (*arg).to_owned()).collect(),
            output: text,
        })
    }
}
