//! The Flywheel API against a real kube-apiserver v1.20 with the operator installed by its chart on the real
//! node: examples become Ready, bad specs are refused by the schema (422) or reported as InvalidSpec naming the
//! field, and the cluster's Prometheus finds the operator through the API server and scrapes its metrics.

use std::time::Duration;

use flywheel_e2e::fixtures::{api_for, condition, create, example, example_files, set};
use flywheel_e2e::http::http_get_at;
use flywheel_e2e::on_node;
use flywheel_e2e::prometheus::PrometheusServer;
use flywheel_e2e::wait::until;
use k8s_openapi::api::events::v1::Event;
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const SETTLE: Duration = Duration::from_secs(30);

async fn setup(prefix: &str) -> Result<(Client, String), Box<dyn std::error::Error>> {
    let cluster = on_node::operator(&[]).await?;
    let client = cluster.client().await?;
    let namespace = cluster.namespace_for_pods(&client, prefix).await?;
    Ok((client, namespace))
}

/// Waits for the operator's verdict on the object's current generation: `(Ready, InvalidSpec)` conditions.
async fn verdict(
    client: &Client,
    namespace: &str,
    kind: &str,
    name: &str,
) -> Result<((String, String, String), (String, String, String)), Box<dyn std::error::Error>> {
    let api = api_for(client, kind, namespace)?;
    let found = until(&format!("{kind}/{name} to be reconciled"), SETTLE, || {
        let api = api.clone();
        async move {
            let object = api.get(name).await.map_err(|e| e.to_string())?;
            let generation = object.metadata.generation;
            match (
                condition(&object, "Ready"),
                condition(&object, "InvalidSpec"),
            ) {
                (Some((rs, rr, rm, rg)), Some((is, ir, im, ig)))
                    if rg == generation && ig == generation =>
                {
                    Ok(((rs, rr, rm), (is, ir, im)))
                }
                _ => Err(format!(
                    "generation {generation:?}, status {:?}",
                    object.data.get("status")
                )),
            }
        }
    })
    .await?;
    Ok(found)
}

/// Asserts the API server refused `manifest` with 422 and a message naming `field`.
async fn assert_refused(manifest: Value, field: &str) -> TestResult {
    let (client, namespace) = setup("refused").await?;
    match create(&client, &namespace, &manifest).await? {
        Ok(object) => Err(format!("accepted an invalid object: {:?}", object.metadata.name).into()),
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(
                status.message.contains(field),
                "422 message should name {field}: {}",
                status.message
            );
            Ok(())
        }
        Err(other) => Err(other.into()),
    }
}

/// Asserts the operator marked `manifest` InvalidSpec with a message naming `field`, and recorded a Warning.
async fn assert_invalid_spec(manifest: Value, field: &str) -> TestResult {
    let (client, namespace) = setup("invalid").await?;
    let kind = manifest["kind"].as_str().unwrap_or_default().to_owned();
    let name = manifest["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    create(&client, &namespace, &manifest).await??;
    let ((ready, ready_reason, _), (invalid, _, message)) =
        verdict(&client, &namespace, &kind, &name).await?;
    assert_eq!(
        (ready.as_str(), ready_reason.as_str(), invalid.as_str()),
        ("False", "InvalidSpec", "True")
    );
    assert!(
        message.contains(field),
        "InvalidSpec should name {field}: {message}"
    );
    if kind == "GPUQuota" {
        // A 1.20 server refuses events.k8s.io/v1 Events about cluster-scoped objects (their namespace must equal
        // the object's, which is empty); newer servers accept them in `default`. The condition is the record.
        return Ok(());
    }
    let events: Api<Event> = Api::namespaced(client.clone(), &namespace);
    let warning = until("an InvalidSpec event", SETTLE, || {
        let events = events.clone();
        let name = name.clone();
        async move {
            let list = events
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            list.items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some("InvalidSpec")
                        && e.regarding.as_ref().and_then(|r| r.name.as_deref())
                            == Some(name.as_str())
                })
                .ok_or_else(|| "no event yet".to_owned())
        }
    })
    .await?;
    assert_eq!(warning.type_.as_deref(), Some("Warning"));
    assert!(warning.note.unwrap_or_default().contains(field));
    Ok(())
}

#[tokio::test]
async fn every_example_becomes_ready_for_its_generation() -> TestResult {
    let (client, namespace) = setup("examples").await?;
    let files = example_files()?;
    assert!(
        files.len() >= 5,
        "examples/ should hold one manifest per kind: {files:?}"
    );
    let mut kinds = std::collections::BTreeSet::new();
    for file in &files {
        let manifest = example(file)?;
        let kind = manifest["kind"].as_str().unwrap_or_default().to_owned();
        let name = manifest["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let output = on_node::operator(&[]).await?.kubectl(&[
            "apply",
            "-n",
            &namespace,
            "-f",
            &flywheel_e2e::repo_root()
                .join("examples")
                .join(file)
                .to_string_lossy(),
        ])?;
        assert!(output.status.success());
        let ((ready, reason, message), (invalid, _, _)) =
            verdict(&client, &namespace, &kind, &name).await?;
        // A TrainingJob is Ready once it produced its ModelVersion (tests/training.rs); here its spec is valid.
        // A Rollout is Ready once its stable version serves: the example's model is not on this namespace's
        // storage, so it says it is not serving (and why), not that its spec is wrong.
        let want = match kind.as_str() {
            "TrainingJob" => (ready.as_str(), reason.as_str()),
            "Rollout" => ("False", "NotServing"),
            _ => ("True", reason.as_str()),
        };
        assert_eq!(
            (ready.as_str(), reason.as_str(), invalid.as_str()),
            (want.0, want.1, "False"),
            "{file}: {message}"
        );
        kinds.insert(kind);
    }
    assert_eq!(kinds.len(), 5, "one example per kind at least: {kinds:?}");

    // A spec change bumps the generation; the verdict follows it.
    let api = api_for(&client, "Rollout", &namespace)?;
    let patch = json!({"spec": {"serving": {"replicas": 3}}});
    let patched = api
        .patch("ctr", &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    assert_eq!(patched.metadata.generation, Some(2));
    // The first reconcile of generation 2 still sees the Deployment it is about to scale (0/2); the next one,
    // woken by that Deployment's change, counts the new replicas.
    until("the Ready message to count 3 replicas", SETTLE, || {
        let client = client.clone();
        let namespace = namespace.clone();
        async move {
            let ((_, reason, message), (invalid, _, _)) =
                verdict(&client, &namespace, "Rollout", "ctr")
                    .await
                    .map_err(|e| e.to_string())?;
            (reason == "NotServing" && invalid == "False" && message.contains("0/3 pods available"))
                .then_some(())
                .ok_or(format!("{reason}, InvalidSpec {invalid}: {message}"))
        }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn both_topologies_are_refused_by_the_schema() -> TestResult {
    let mut job = example("trainingjob-ps.yaml")?;
    set(
        &mut job,
        "/spec/topology/dataParallel",
        json!({"workers": 2, "gpusPerWorker": 1}),
    );
    assert_refused(job, "spec.topology").await
}

#[tokio::test]
async fn negative_replicas_are_refused_by_the_schema() -> TestResult {
    let mut rollout = example("rollout.yaml")?;
    set(&mut rollout, "/spec/serving/replicas", json!(-1));
    assert_refused(rollout, "spec.serving.replicas").await
}

#[tokio::test]
async fn canary_weight_above_100_is_refused_by_the_schema() -> TestResult {
    let mut rollout = example("rollout.yaml")?;
    set(
        &mut rollout,
        "/spec/strategy/canary/steps/4",
        json!({"setWeight": 120}),
    );
    assert_refused(rollout, "setWeight").await
}

#[tokio::test]
async fn unknown_gpu_resource_in_a_quota_is_refused_by_the_schema() -> TestResult {
    let mut quota = example("gpuquota.yaml")?;
    set(&mut quota, "/metadata/name", json!("unknown-gpu"));
    set(
        &mut quota,
        "/spec/limits/0/resource",
        json!("nvidia.com/gpus"),
    );
    assert_refused(quota, "spec.limits.resource").await
}

#[tokio::test]
async fn unknown_gpu_resource_in_a_job_is_refused_by_the_schema() -> TestResult {
    let mut job = example("trainingjob-gpu.yaml")?;
    set(
        &mut job,
        "/spec/topology/dataParallel/gpuResource",
        json!("google.com/tpu"),
    );
    assert_refused(job, "spec.topology.dataParallel.gpuResource").await
}

#[tokio::test]
async fn duplicate_feature_names_are_refused_by_the_schema() -> TestResult {
    let mut view = example("featureview.yaml")?;
    set(&mut view, "/spec/features/1/name", json!("user_bucket"));
    assert_refused(view, "spec.features").await
}

#[tokio::test]
async fn canary_weights_not_increasing_get_invalid_spec() -> TestResult {
    // The CEL rule for this is dropped by a 1.20 server; the controller's mirror of it must catch it.
    let mut rollout = example("rollout.yaml")?;
    set(
        &mut rollout,
        "/spec/strategy/canary/steps/4",
        json!({"setWeight": 5}),
    );
    assert_invalid_spec(rollout, "spec.strategy.canary.steps[4].setWeight").await
}

#[tokio::test]
async fn an_analysis_metric_with_builtin_and_query_gets_invalid_spec() -> TestResult {
    let mut rollout = example("rollout.yaml")?;
    set(
        &mut rollout,
        "/spec/analysis/metrics/1",
        json!({"name": "calibration", "builtin": "calibrationDeviation", "query": "vector(1)", "max": 0.1}),
    );
    assert_invalid_spec(rollout, "spec.analysis.metrics[1]").await
}

#[tokio::test]
async fn a_pause_with_a_bad_duration_is_refused_by_the_schema() -> TestResult {
    let mut rollout = example("rollout.yaml")?;
    set(
        &mut rollout,
        "/spec/strategy/canary/steps/1",
        json!({"pause": {"duration": "ten minutes"}}),
    );
    assert_refused(rollout, "duration").await
}

#[tokio::test]
async fn logistic_with_hidden_layers_gets_invalid_spec() -> TestResult {
    let mut job = example("trainingjob-ps.yaml")?;
    set(&mut job, "/spec/model/architecture", json!("logistic"));
    assert_invalid_spec(job, "spec.model.hiddenLayers").await
}

#[tokio::test]
async fn relative_gate_without_baseline_gets_invalid_spec() -> TestResult {
    let mut version = example("modelversion.yaml")?;
    set(
        &mut version,
        "/spec/validation/gates/0",
        json!({"metric": "auc", "maxDecrease": 0.002}),
    );
    assert_invalid_spec(version, "spec.validation.gates[0].baseline").await
}

#[tokio::test]
async fn unsorted_bucket_boundaries_get_invalid_spec() -> TestResult {
    let mut view = example("featureview.yaml")?;
    set(
        &mut view,
        "/spec/features/2/transform/bucketize/boundaries",
        json!([18, 35, 25]),
    );
    assert_invalid_spec(view, "spec.features[2].transform.bucketize.boundaries").await
}

#[tokio::test]
async fn quota_covering_no_namespace_gets_invalid_spec() -> TestResult {
    let mut quota = example("gpuquota.yaml")?;
    set(&mut quota, "/metadata/name", json!("covers-nothing"));
    set(&mut quota, "/spec/namespaces", json!({}));
    assert_invalid_spec(quota, "spec.namespaces").await
}

#[tokio::test]
async fn fixing_an_invalid_spec_clears_invalid_spec_and_ready_says_what_it_waits_for() -> TestResult
{
    let (client, namespace) = setup("fixed").await?;
    let mut rollout = example("rollout.yaml")?;
    set(
        &mut rollout,
        "/spec/strategy/canary/steps/4",
        json!({"setWeight": 5}),
    );
    create(&client, &namespace, &rollout).await??;
    let ((ready, reason, _), _) = verdict(&client, &namespace, "Rollout", "ctr").await?;
    assert_eq!((ready.as_str(), reason.as_str()), ("False", "InvalidSpec"));
    let api = api_for(&client, "Rollout", &namespace)?;
    let fixed = json!({"spec": {"strategy": {"canary": {"steps": [{"setWeight": 1}, {"setWeight": 50}, {"setWeight": 100}]}}}});
    api.patch("ctr", &PatchParams::default(), &Patch::Merge(&fixed))
        .await?;
    // Valid now; Ready waits for a served version (its ModelVersion does not exist here).
    let ((ready, reason, message), (invalid, _, _)) =
        verdict(&client, &namespace, "Rollout", "ctr").await?;
    assert_eq!(
        (ready.as_str(), reason.as_str(), invalid.as_str()),
        ("False", "NotServing", "False"),
        "{message}"
    );
    Ok(())
}

#[tokio::test]
async fn editing_an_accepted_artifact_gets_invalid_spec() -> TestResult {
    let (client, namespace) = setup("immutable").await?;
    create(&client, &namespace, &example("modelversion.yaml")?).await??;
    let ((ready, _, _), _) = verdict(&client, &namespace, "ModelVersion", "ctr-v1").await?;
    assert_eq!(ready, "True");
    let api = api_for(&client, "ModelVersion", &namespace)?;
    let edit = json!({"spec": {"artifact": {"sha256": "0".repeat(64)}}});
    api.patch("ctr-v1", &PatchParams::default(), &Patch::Merge(&edit))
        .await?;
    let ((ready, _, _), (invalid, _, message)) =
        verdict(&client, &namespace, "ModelVersion", "ctr-v1").await?;
    assert_eq!((ready.as_str(), invalid.as_str()), ("False", "True"));
    assert!(message.contains("spec.artifact is immutable"), "{message}");
    Ok(())
}

#[tokio::test]
async fn metrics_scrape_parses_as_prometheus_text() -> TestResult {
    let (client, namespace) = setup("metrics").await?;
    create(&client, &namespace, &example("featureview.yaml")?).await??;
    verdict(&client, &namespace, "FeatureView", "ctr-events").await?;
    let operator = on_node::leader_address(&client).await?;
    assert_eq!(http_get_at(operator, "/healthz").await?.0, 200);
    assert_eq!(http_get_at(operator, "/readyz").await?.0, 200);
    let (code, body) = http_get_at(operator, "/metrics").await?;
    assert_eq!(code, 200);
    for family in [
        "flywheel_operator_reconciliations_total{kind=\"FeatureView\"}",
        "flywheel_operator_reconcile_duration_seconds_bucket",
        "flywheel_operator_leader 1",
    ] {
        assert!(body.contains(family), "missing {family} in:\n{body}");
    }
    // The real consumer: the cluster's Prometheus finds the operator through its Service, as the chart's
    // ServiceMonitor selects it, scrapes it, and answers queries over it.
    let cluster = on_node::operator(&[]).await?;
    let prometheus = PrometheusServer::for_cluster(cluster, None).await?;
    let samples = until("prometheus to scrape the operator", SETTLE, || async {
        let targets = prometheus.targets().await.map_err(|e| e.to_string())?;
        if let Some((_, health, error)) = targets
            .iter()
            .find(|(job, health, _)| job == "flywheel-operator" && health != "up")
        {
            return Err(format!("target {health}: {error}"));
        }
        let result = prometheus
            .query("flywheel_operator_reconciliations_total{job=\"flywheel-operator\",kind=\"FeatureView\"}")
            .await
            .map_err(|e| e.to_string())?;
        if result.is_empty() {
            Err(format!("targets {targets:?}, no samples yet"))
        } else {
            Ok(result)
        }
    })
    .await?;
    let reconciled: f64 = samples[0]["value"][1].as_str().unwrap_or("0").parse()?;
    assert!(reconciled >= 1.0, "{samples:?}");
    assert!(
        samples[0]["metric"]["pod"]
            .as_str()
            .is_some_and(|pod| pod.starts_with("flywheel-operator-")),
        "labeled with the operator's pod: {samples:?}"
    );
    let leader = prometheus
        .query("flywheel_operator_leader{job=\"flywheel-operator\"}")
        .await?;
    assert_eq!(leader[0]["value"][1], "1");
    Ok(())
}

#[tokio::test]
async fn model_version_gates_validate_or_reject_against_the_alias_holder() -> TestResult {
    let (client, namespace) = setup("gates").await?;
    let api = api_for(&client, "ModelVersion", &namespace)?;
    let phase_of = |name: &'static str| {
        let api = api.clone();
        async move {
            until(&format!("{name} to get a verdict"), SETTLE, || {
                let api = api.clone();
                async move {
                    let object = api.get(name).await.map_err(|e| e.to_string())?;
                    let status = object.data.get("status").cloned().unwrap_or_default();
                    match status["phase"].as_str() {
                        Some("Validated" | "Rejected") => Ok(status),
                        _ => Err(status.to_string()),
                    }
                }
            })
            .await
        }
    };
    let mut good = example("modelversion.yaml")?;
    set(&mut good, "/metadata/name", json!("ctr-good"));
    create(&client, &namespace, &good).await??;
    let status = phase_of("ctr-good").await?;
    assert_eq!(status["phase"], "Validated", "{status}");
    assert_eq!(status["gateResults"].as_array().map(Vec::len), Some(3));

    let mut worse = example("modelversion.yaml")?;
    set(&mut worse, "/metadata/name", json!("ctr-worse"));
    set(&mut worse, "/spec/metrics/auc", json!(0.70));
    set(
        &mut worse,
        "/spec/validation/gates/0",
        json!({"metric": "auc", "baseline": {"modelVersion": "ctr-good"}, "maxDecrease": 0.002}),
    );
    create(&client, &namespace, &worse).await??;
    let status = phase_of("ctr-worse").await?;
    assert_eq!(status["phase"], "Rejected", "{status}");
    let auc = &status["gateResults"][0];
    assert_eq!(auc["verdict"], "Fail");
    assert_eq!(
        auc["threshold"],
        ">= 0.779000 (baseline ctr-good 0.781 - 0.002)"
    );
    let validated = status["conditions"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == "Validated"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(validated["status"], "False", "{validated}");
    assert!(
        validated["message"]
            .as_str()
            .unwrap_or_default()
            .contains("auc 0.7 failed")
    );
    Ok(())
}
