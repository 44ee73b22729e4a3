//! The ArgoCD health checks (`charts/flywheel/argocd/*.lua`) run by a real Lua 5.4 (Debian's `lua5.4`, the
//! language version ArgoCD embeds) on sample objects of every kind, as ArgoCD would run them: `obj` is the
//! object as a Lua table and the script returns `{status, message}`.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

/// A Lua table constructor for a JSON value (`null` becomes `nil`, arrays are 1-based as Lua's).
fn lua(value: &Value) -> String {
    match value {
        Value::Null => "nil".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => format!("{s:?}"),
        Value::Array(items) => format!(
            "{{{}}}",
            items.iter().map(lua).collect::<Vec<_>>().join(", ")
        ),
        Value::Object(fields) => format!(
            "{{{}}}",
            fields
                .iter()
                .map(|(key, value)| format!("[{key:?}] = {}", lua(value)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Runs `<kind>.lua` (with `common.lua` before it, as installed) on `object`: (status, message).
fn health(kind: &str, object: &Value) -> (String, String) {
    let dir = flywheel_e2e::repo_root().join("charts/flywheel/argocd");
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let program = format!(
        "local obj = {}\nlocal function check()\n{}\n{}\nend\nlocal hs = check()\nio.write(hs.status, \"\\t\", hs.message or \"\")\n",
        lua(object),
        read("common.lua"),
        read(&format!("{kind}.lua")),
    );
    let mut child = Command::new("lua5.4")
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("lua5.4 (install it with e2e/scripts/install-system-deps.sh): {e}")
        });
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(program.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let output = child.wait_with_output().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        output.status.success(),
        "{kind}.lua failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let text = String::from_utf8_lossy(&output.stdout).into_owned();
    let (status, message) = text.split_once('\t').unwrap_or((text.as_str(), ""));
    (status.to_owned(), message.to_owned())
}

fn object(status: Value) -> Value {
    json!({"metadata": {"name": "x", "generation": 2}, "spec": {}, "status": status})
}

fn observed(mut status: Value) -> Value {
    status["observedGeneration"] = json!(2);
    object(status)
}

#[test]
fn rollout_phases_map_to_argocd_health() {
    let cases = [
        (
            json!({"phase": "Healthy", "stableVersion": "ctr-v2"}),
            "Healthy",
            "serving ctr-v2",
        ),
        (
            json!({"phase": "Progressing", "canaryVersion": "ctr-v3", "canaryWeight": 5, "stepSummary": "1/4"}),
            "Progressing",
            "ctr-v3 at 5%, step 1/4",
        ),
        (
            json!({"phase": "Paused", "pauseReason": "analysis inconclusive 3 times"}),
            "Suspended",
            "analysis inconclusive 3 times",
        ),
        (
            json!({"phase": "Degraded", "abortReason": "alert FlywheelCalibrationDeviation is firing"}),
            "Degraded",
            "alert FlywheelCalibrationDeviation is firing",
        ),
    ];
    for (status, expected, message) in cases {
        assert_eq!(
            health("Rollout", &observed(status)),
            (expected.to_owned(), message.to_owned())
        );
    }
    let stale = object(json!({"observedGeneration": 1, "phase": "Healthy"}));
    assert_eq!(
        health("Rollout", &stale).0,
        "Progressing",
        "a generation the operator has not seen"
    );
    assert_eq!(
        health(
            "Rollout",
            &json!({"metadata": {"generation": 1}, "spec": {}})
        )
        .0,
        "Progressing"
    );
}

#[test]
fn training_jobs_model_versions_quotas_and_feature_views_map_to_argocd_health() {
    let job = |status: Value| health("TrainingJob", &observed(status)).0;
    assert_eq!(
        job(json!({"phase": "Succeeded", "modelVersion": "ctr-v2"})),
        "Healthy"
    );
    assert_eq!(
        job(
            json!({"phase": "Failed", "conditions": [{"type": "Failed", "status": "True", "message": "backoffLimit (3) reached"}]})
        ),
        "Degraded"
    );
    assert_eq!(job(json!({"phase": "Suspended"})), "Suspended");
    assert_eq!(
        job(json!({"phase": "Queued", "queue": {"reason": "waiting for 8 GPUs"}})),
        "Progressing"
    );
    assert_eq!(job(json!({"phase": "Running"})), "Progressing");
    let version = |status: Value| health("ModelVersion", &observed(status));
    assert_eq!(
        version(
            json!({"phase": "Rejected", "conditions": [{"type": "Validated", "status": "False", "message": "auc 0.7 failed >= 0.75"}]})
        ),
        ("Degraded".to_owned(), "auc 0.7 failed >= 0.75".to_owned())
    );
    assert_eq!(version(json!({"phase": "Validated"})).0, "Healthy");
    assert_eq!(version(json!({"phase": "Pending"})).0, "Progressing");
    for kind in ["GPUQuota", "FeatureView"] {
        let ready =
            observed(json!({"conditions": [{"type": "Ready", "status": "True", "message": "ok"}]}));
        assert_eq!(health(kind, &ready).0, "Healthy");
        let invalid = observed(json!({"conditions": [
            {"type": "Ready", "status": "False", "message": "spec"},
            {"type": "InvalidSpec", "status": "True", "message": "spec.namespaces: covers nothing"},
        ]}));
        assert_eq!(
            health(kind, &invalid),
            (
                "Degraded".to_owned(),
                "spec.namespaces: covers nothing".to_owned()
            )
        );
    }
}
