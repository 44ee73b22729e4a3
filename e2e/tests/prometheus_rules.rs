//! The chart's serving alerts (`charts/flywheel/files/serving-rules.yaml`) evaluated by Prometheus's own rule
//! engine: `promtool check rules` for syntax, and `promtool test rules` on the cases of
//! `tests/prometheus/serving-rules-test.yaml` (a clear drop on enough samples fires; the same drop on a
//! small window, or a miscalibrated version without evidence, does not).

use std::process::Command;

fn promtool(args: &[&str]) -> Result<String, String> {
    let output = Command::new("promtool")
        .args(args)
        .current_dir(flywheel_e2e::repo_root().join("e2e/tests/prometheus"))
        .output()
        .map_err(|e| {
            format!("promtool (install it with e2e/scripts/install-system-deps.sh): {e}")
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() {
        Ok(text)
    } else {
        Err(format!("promtool {args:?} failed:\n{text}"))
    }
}

#[test]
fn the_chart_rules_are_valid_prometheus_rules() -> Result<(), String> {
    let rules = flywheel_e2e::repo_root().join("charts/flywheel/files/serving-rules.yaml");
    let text = promtool(&["check", "rules", &rules.to_string_lossy()])?;
    assert!(text.contains("SUCCESS"), "{text}");
    Ok(())
}

#[test]
fn alerts_fire_on_evidence_and_not_on_noise() -> Result<(), String> {
    let text = promtool(&["test", "rules", "serving-rules-test.yaml"])?;
    assert!(text.contains("SUCCESS"), "{text}");
    Ok(())
}
