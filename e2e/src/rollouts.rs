//! Rollout test fixtures: an exporter of serving metrics whose values a test sets, a real Prometheus scraping
//! it, and helpers to drive a Rollout `ctr` and read what the operator (the chart's, on the node) did.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::cluster::TestCluster;
use crate::fixtures::{api_for, create, example, set};
use crate::on_node;
use crate::prometheus::PrometheusServer;
use crate::wait::until;

type BoxError = Box<dyn std::error::Error>;

/// How long a wait that includes a canary's pods becoming available may take: a weight moves only then, and on
/// the test node (dev-built images, test binaries in parallel on two cores) a pod can take a while to be ready.
pub const CANARY_UP: Duration = Duration::from_secs(120);

/// One version's serving metrics: online AUC, calibration, labeled samples.
pub type Quality = (f64, f64, f64);

/// Serving metrics per version, as the test sets them.
#[derive(Clone, Default)]
pub struct Exporter {
    pub versions: Arc<Mutex<BTreeMap<String, Quality>>>,
    /// The namespace label of every series (a cluster's scrape adds the pod's namespace).
    namespace: String,
}

impl Exporter {
    pub async fn start(namespace: &str) -> Result<(Exporter, u16), BoxError> {
        let exporter = Exporter {
            namespace: namespace.to_owned(),
            ..Exporter::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let serving = exporter.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let body = serving.render();
                tokio::spawn(async move {
                    let mut request = [0u8; 4096];
                    let _ = stream.read(&mut request).await;
                    let response = format!(
                        "HTTP/1.0 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                });
            }
        });
        Ok((exporter, port))
    }

    pub fn set(&self, version: &str, auc: f64, calibration: f64, samples: f64) {
        self.versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(version.to_owned(), (auc, calibration, samples));
    }

    fn render(&self) -> String {
        let versions = self
            .versions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut text = String::new();
        for (version, (auc, calibration, samples)) in versions {
            let labels = format!(
                "namespace=\"{}\",model=\"ctr\",version=\"{version}\"",
                self.namespace
            );
            text += &format!("flywheel_serving_online_auc{{{labels}}} {auc}\n");
            text += &format!("flywheel_serving_online_calibration{{{labels}}} {calibration}\n");
            text += &format!("flywheel_serving_online_window_samples{{{labels}}} {samples}\n");
        }
        text
    }
}

pub struct Setup {
    pub client: Client,
    pub namespace: String,
    pub exporter: Exporter,
    pub prometheus: PrometheusServer,
    /// The model every ModelVersion of the test serves, on the namespace's claim (none without a node).
    artifact: Option<Artifact>,
}

/// A trained model on the claim, as a ModelVersion names it.
struct Artifact {
    uri: String,
    sha256: String,
    feature_schema_hash: String,
}

/// Trains a small model into `<volume>/models/ctr`, the claim's `models/ctr` in the pods.
fn trained_artifact(volume: &std::path::Path) -> Result<Artifact, BoxError> {
    let data = crate::serving::dataset(&volume.join("data"), 2_000, 5)?;
    let path = crate::serving::train(&data.dir, &volume.join("models").join("ctr"), 1)?;
    let bytes = std::fs::read(&path)?;
    let card = flywheel_ml::artifact::card(&bytes)?;
    Ok(Artifact {
        uri: format!("file://{}/models/ctr/model.fwm", on_node::STORAGE),
        sha256: flywheel_ml::artifact::sha256_hex(&bytes),
        feature_schema_hash: card.feature_schema_hash,
    })
}

impl Setup {
    /// A fresh namespace on the node's cluster (the operator installed by the chart) with a claim holding a
    /// trained model, so every version's serving pods really become available; an exporter of the quality
    /// metrics the test sets, and a Prometheus scraping it on the node's address, where the operator's pod
    /// queries it.
    pub async fn start(prefix: &str) -> Result<Setup, BoxError> {
        let cluster = on_node::operator(&[]).await?;
        let client = cluster.client().await?;
        let (namespace, volume) = on_node::namespace_with_storage(cluster, &client, prefix).await?;
        let artifact = trained_artifact(&volume)?;
        let (exporter, exporter_port) = Exporter::start(&namespace).await?;
        let prometheus =
            PrometheusServer::start(on_node::NODE_IP, &[("serving", exporter_port)]).await?;
        Ok(Setup {
            client,
            namespace,
            exporter,
            prometheus,
            artifact: Some(artifact),
        })
    }

    /// The same on `cluster` with Prometheus listening on `listen`: the operator's benchmark runs the operator
    /// as a process of this machine on a cluster without a node, so that only the operator is measured.
    pub async fn in_cluster(
        cluster: &TestCluster,
        prefix: &str,
        listen: Ipv4Addr,
    ) -> Result<Setup, BoxError> {
        let client = cluster.client().await?;
        let namespace = cluster.namespace(&client, prefix).await?;
        let (exporter, exporter_port) = Exporter::start(&namespace).await?;
        let prometheus = PrometheusServer::start(listen, &[("serving", exporter_port)]).await?;
        Ok(Setup {
            client,
            namespace,
            exporter,
            prometheus,
            artifact: None,
        })
    }
}

/// A Validated ModelVersion `name` of the setup's trained model.
pub async fn model_version(setup: &Setup, name: &str) -> Result<(), BoxError> {
    model_version_with(setup, name, |_| {}).await
}

/// A Validated ModelVersion whose artifact digest is wrong: its serving pods run but never become ready.
pub async fn unservable_model_version(setup: &Setup, name: &str) -> Result<(), BoxError> {
    model_version_with(setup, name, |version| {
        set(version, "/spec/artifact/sha256", json!("0".repeat(64)));
    })
    .await
}

async fn model_version_with(
    setup: &Setup,
    name: &str,
    edit: impl FnOnce(&mut Value),
) -> Result<(), BoxError> {
    let mut version = example("modelversion.yaml")?;
    set(&mut version, "/metadata/name", json!(name));
    if let Some(artifact) = &setup.artifact {
        set(&mut version, "/spec/artifact/uri", json!(artifact.uri));
        set(
            &mut version,
            "/spec/artifact/sha256",
            json!(artifact.sha256),
        );
        set(
            &mut version,
            "/spec/featureSchemaHash",
            json!(artifact.feature_schema_hash),
        );
    }
    edit(&mut version);
    create(&setup.client, &setup.namespace, &version).await??;
    let api = api_for(&setup.client, "ModelVersion", &setup.namespace)?;
    until(
        &format!("{name} validated"),
        Duration::from_secs(30),
        || {
            let api = api.clone();
            async move {
                let object = api.get(name).await.map_err(|e| e.to_string())?;
                let phase = object.data["status"]["phase"].clone();
                (phase == "Validated")
                    .then_some(())
                    .ok_or(phase.to_string())
            }
        },
    )
    .await?;
    Ok(())
}

/// The Rollout `ctr` of `version`, analysed every second by Prometheus, aborting on the calibration alert.
pub fn rollout_manifest(setup: &Setup, version: &str, min_samples: u64) -> Value {
    json!({
        "apiVersion": "flywheel.dev/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": "ctr"},
        "spec": {
            "modelVersion": version,
            "serving": {"replicas": 1},
            "analysis": {
                "prometheus": setup.prometheus.url(),
                "interval": "1s",
                "count": 2,
                "minSamples": min_samples,
                "failureLimit": 0,
                "inconclusiveLimit": 2,
                "metrics": [
                    {"name": "auc-drop", "builtin": "aucDrop", "max": 0.005},
                    {"name": "calibration", "builtin": "calibrationDeviation", "max": 0.1},
                ],
            },
            "alerts": ["FlywheelCalibrationDeviation"],
        },
    })
}

pub async fn rollout_status(setup: &Setup) -> Result<Value, BoxError> {
    let api = api_for(&setup.client, "Rollout", &setup.namespace)?;
    let object: DynamicObject = api.get("ctr").await?;
    Ok(object.data.get("status").cloned().unwrap_or_default())
}

pub async fn wait_status(
    setup: &Setup,
    what: &str,
    limit: Duration,
    check: impl Fn(&Value) -> bool,
) -> Result<Value, BoxError> {
    let api = api_for(&setup.client, "Rollout", &setup.namespace)?;
    let check = &check;
    Ok(until(what, limit, || {
        let api = api.clone();
        async move {
            let object = api.get("ctr").await.map_err(|e| e.to_string())?;
            let status = object.data.get("status").cloned().unwrap_or_default();
            if check(&status) {
                Ok(status)
            } else {
                Err(status.to_string())
            }
        }
    })
    .await?)
}

pub async fn set_target(setup: &Setup, version: &str) -> Result<(), BoxError> {
    let api = api_for(&setup.client, "Rollout", &setup.namespace)?;
    api.patch(
        "ctr",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"modelVersion": version}})),
    )
    .await?;
    Ok(())
}

/// The weights of the router's route table, by version.
pub async fn routes(setup: &Setup) -> Result<BTreeMap<String, u64>, BoxError> {
    let maps: Api<ConfigMap> = Api::namespaced(setup.client.clone(), &setup.namespace);
    let map = maps.get("ctr-routes").await?;
    let text = map
        .data
        .unwrap_or_default()
        .get("routes.json")
        .cloned()
        .unwrap_or_default();
    let table: Value = serde_json::from_str(&text)?;
    Ok(table["backends"]
        .as_array()
        .map(|backends| {
            backends
                .iter()
                .map(|b| {
                    (
                        b["name"].as_str().unwrap_or_default().to_owned(),
                        b["weight"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Analysis reads what Prometheus scraped: waits until every version the exporter has is there.
pub async fn wait_scraped(setup: &Setup) -> Result<(), BoxError> {
    let expected = setup
        .exporter
        .versions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .len();
    let prometheus = &setup.prometheus;
    until(
        "Prometheus scraped the exporter",
        Duration::from_secs(30),
        || async move {
            let series = prometheus
                .query("flywheel_serving_online_window_samples")
                .await
                .map_err(|e| e.to_string())?;
            (series.len() == expected)
                .then_some(())
                .ok_or(format!("{} series", series.len()))
        },
    )
    .await?;
    Ok(())
}

pub async fn serving_from(setup: &Setup, version: &str) -> Result<Value, BoxError> {
    wait_scraped(setup).await?;
    create(
        &setup.client,
        &setup.namespace,
        &rollout_manifest(setup, version, 1000),
    )
    .await??;
    wait_status(
        setup,
        &format!("{version} stable"),
        Duration::from_secs(30),
        |s| s["stableVersion"] == version && s["phase"] == "Healthy",
    )
    .await
}
