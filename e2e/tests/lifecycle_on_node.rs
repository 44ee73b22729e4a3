//! The lifecycle on a real node, as a user runs it: a model trained by a gang of trainer-image pods (the
//! operator installed by the chart) is served by a Rollout's serving and router pods (serving image) and
//! answers through the Rollout's Service, the model read from the claim the gang wrote it to. The next
//! TrainingJobs state gates against the version holding `production`, and the versions they create are
//! validated or rejected by them.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use flywheel_crds::modelversion::ModelVersionPhase;
use flywheel_crds::trainingjob::TrainingPhase;
use flywheel_crds::{ModelVersion, TrainingJob};
use flywheel_e2e::fixtures::api_for;
use flywheel_e2e::on_node::{self, STORAGE, generate_training_data, namespace_with_storage};
use flywheel_e2e::serving::{HttpClient, rest_body};
use flywheel_e2e::training_jobs::{finished, job_until};
use flywheel_e2e::wait::until;
use flywheel_ml::synthetic::{SyntheticConfig, generate};
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const TRAINING: Duration = Duration::from_secs(300);
const SETTLE: Duration = Duration::from_secs(90);

/// A job over the generated data, writing checkpoints and the model onto the same volume.
fn job(name: &str, topology: Value) -> Value {
    json!({
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "data": {"dataset": {
                "train": format!("file://{STORAGE}/data/train.parquet"),
                "eval": format!("file://{STORAGE}/data/eval.parquet"),
                "label": "clicked",
            }},
            "model": {"name": "ctr", "architecture": "deepfm", "embeddingDim": 8, "hiddenLayers": [32]},
            "optimizer": {"kind": "adagrad", "learningRate": 0.002, "sparseLearningRate": 0.05},
            "epochs": 1, "batchSize": 256, "seed": 7,
            "topology": topology,
            "checkpoint": {"uri": format!("file://{STORAGE}/checkpoints"), "everySteps": 20},
            "backoffLimit": 2,
            "output": {"artifactUri": format!("file://{STORAGE}/models")},
        },
    })
}

#[tokio::test]
async fn a_trained_model_is_served_from_containers_through_the_rollouts_router() -> TestResult {
    let cluster = on_node::operator(&[]).await?;
    let client = cluster.client().await?;
    let (namespace, _) = namespace_with_storage(cluster, &client, "serve-node").await?;
    generate_training_data(&client, &namespace, 20_000).await?;
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &namespace);
    jobs.create(
        &PostParams::default(),
        &serde_json::from_value(job("ctr-v1", json!({"single": {}})))?,
    )
    .await?;
    let done = job_until(
        &client,
        &namespace,
        "ctr-v1",
        "to finish",
        TRAINING,
        finished,
    )
    .await?;
    let status = done.status.unwrap_or_default();
    assert_eq!(status.phase, Some(TrainingPhase::Succeeded), "{status:?}");

    let rollouts = api_for(&client, "Rollout", &namespace)?;
    rollouts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "flywheel.dev/v1alpha1", "kind": "Rollout",
                "metadata": {"name": "ctr"},
                "spec": {
                    "modelVersion": "ctr-v1",
                    "serving": {"replicas": 1},
                    "traffic": {"router": {"replicas": 1}},
                },
            }))?,
        )
        .await?;
    until("ctr-v1 to be the stable version", TRAINING, || {
        let rollouts = rollouts.clone();
        async move {
            let rollout = rollouts.get("ctr").await.map_err(|e| e.to_string())?;
            let status = rollout.data.get("status").cloned().unwrap_or_default();
            if status["stableVersion"] == "ctr-v1" {
                Ok(())
            } else {
                Err(status.to_string())
            }
        }
    })
    .await?;

    // Clients call the Rollout's Service: kube-proxy sends them to the router pod, which forwards to the
    // serving pod by its Service's DNS name; the model was read from the claim, mounted read-only.
    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    let cluster_ip: Ipv4Addr = services
        .get("ctr")
        .await?
        .spec
        .and_then(|spec| spec.cluster_ip)
        .ok_or("the Rollout's Service has no ClusterIP")?
        .parse()?;
    let rows = generate(&SyntheticConfig {
        seed: 3,
        rows: 16,
        ..SyntheticConfig::default()
    })
    .impressions;
    let body = rest_body(Some("node"), &rows).to_string().into_bytes();
    let http = HttpClient::default();
    let answer = until("a prediction through the router", SETTLE, || {
        let http = http.clone();
        let body = body.clone();
        async move {
            match http
                .send_to(
                    "POST",
                    SocketAddr::from((cluster_ip, 8080)),
                    "/v2/models/ctr/infer",
                    Some(body),
                    &[("x-user-id", "u-1")],
                )
                .await
            {
                Ok((200, answer)) => Ok(answer),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await?;
    let predictions: Vec<f64> = answer["outputs"][0]["data"]
        .as_array()
        .ok_or_else(|| format!("no outputs in {answer}"))?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    assert_eq!(predictions.len(), rows.len(), "{answer}");
    assert!(
        predictions.iter().all(|p| *p > 0.0 && *p < 1.0),
        "{predictions:?}"
    );

    // The served version holds `production`; the next jobs state gates against it, and their versions are
    // judged by them: a retrain with the same data and seed (the same model) passes, one that barely learned
    // is rejected.
    let versions: Api<ModelVersion> = Api::namespaced(client.clone(), &namespace);
    until("ctr-v1 to hold production", SETTLE, || {
        let versions = versions.clone();
        async move {
            let aliases = versions
                .get("ctr-v1")
                .await
                .map_err(|e| e.to_string())?
                .status
                .map(|s| s.aliases)
                .unwrap_or_default();
            if aliases.iter().any(|a| a == "production") {
                Ok(())
            } else {
                Err(format!("{aliases:?}"))
            }
        }
    })
    .await?;
    let gated = |name: &str| {
        let mut manifest = job(name, json!({"single": {}}));
        manifest["spec"]["validation"] = json!({"gates": [
            {"metric": "auc", "baseline": {"alias": "production"}, "maxDecrease": 0.002},
        ]});
        manifest
    };
    let mut untrained = gated("ctr-untrained");
    untrained["spec"]["optimizer"] =
        json!({"kind": "adagrad", "learningRate": 1e-9, "sparseLearningRate": 1e-9});
    for manifest in [gated("ctr-v2"), untrained] {
        jobs.create(&PostParams::default(), &serde_json::from_value(manifest)?)
            .await?;
    }
    let verdict = |name: &'static str| {
        let versions = versions.clone();
        async move {
            until(&format!("{name} to get a verdict"), TRAINING, || {
                let versions = versions.clone();
                async move {
                    let version = versions
                        .get_opt(name)
                        .await
                        .map_err(|e| e.to_string())?
                        .ok_or("not created yet")?;
                    match version.status.as_ref().and_then(|s| s.phase) {
                        Some(ModelVersionPhase::Validated | ModelVersionPhase::Rejected) => {
                            Ok(version)
                        }
                        other => Err(format!("{other:?}")),
                    }
                }
            })
            .await
        }
    };
    let retrained = verdict("ctr-v2").await?;
    let status = retrained.status.unwrap_or_default();
    assert_eq!(
        status.phase,
        Some(ModelVersionPhase::Validated),
        "{status:?}"
    );
    assert_eq!(status.gate_results.len(), 1, "{status:?}");
    let untrained = verdict("ctr-untrained").await?;
    let status = untrained.status.unwrap_or_default();
    assert_eq!(
        status.phase,
        Some(ModelVersionPhase::Rejected),
        "{status:?}"
    );
    assert!(
        status.gate_results[0]
            .threshold
            .contains("(baseline ctr-v1 "),
        "judged against the production holder: {:?}",
        status.gate_results
    );
    // The first version stated no gates, and says so.
    let first = versions.get("ctr-v1").await?.status.unwrap_or_default();
    let validated = first
        .conditions
        .iter()
        .find(|c| c.type_ == "Validated")
        .ok_or("no Validated condition")?;
    assert_eq!(validated.reason, "NoGates", "{validated:?}");
    Ok(())
}
