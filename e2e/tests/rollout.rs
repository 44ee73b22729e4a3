//! Rollouts against a real kube-apiserver and a real Prometheus (Debian's) scraping an exporter of the serving
//! metrics whose values each test sets: progressions, aborts on analysis and on an Alertmanager webhook,
//! inconclusive analysis, and the route table the router reads.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use flywheel_e2e::cluster::TestCluster;
use flywheel_e2e::fixtures::{api_for, create, example, set};
use flywheel_e2e::operator::OperatorProcess;
use flywheel_e2e::prometheus::PrometheusServer;
use flywheel_e2e::wait::until;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type TestResult = Result<(), Box<dyn std::error::Error>>;

static OPERATOR: OnceLock<Result<OperatorProcess, String>> = OnceLock::new();

fn operator(cluster: &TestCluster) -> Result<u16, String> {
    OPERATOR
        .get_or_init(|| {
            OperatorProcess::spawn(cluster, "rollout-tests", &["--no-leader-election"])
                .map_err(|e| e.to_string())
        })
        .as_ref()
        .map(|operator| operator.http_port)
        .map_err(Clone::clone)
}

/// One version's serving metrics: online AUC, calibration, labeled samples.
type Quality = (f64, f64, f64);

/// Serving metrics per version, as the test sets them.
#[derive(Clone, Default)]
struct Exporter {
    versions: Arc<Mutex<BTreeMap<String, Quality>>>,
}

impl Exporter {
    async fn start() -> Result<(Exporter, u16), Box<dyn std::error::Error>> {
        let exporter = Exporter::default();
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

    fn set(&self, version: &str, auc: f64, calibration: f64, samples: f64) {
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
            let labels = format!("model=\"ctr\",version=\"{version}\"");
            text += &format!("flywheel_serving_online_auc{{{labels}}} {auc}\n");
            text += &format!("flywheel_serving_online_calibration{{{labels}}} {calibration}\n");
            text += &format!("flywheel_serving_online_window_samples{{{labels}}} {samples}\n");
        }
        text
    }
}

struct Setup {
    client: Client,
    namespace: String,
    exporter: Exporter,
    operator_port: u16,
    prometheus: PrometheusServer,
    prometheus_port: u16,
}

async fn setup(prefix: &str) -> Result<Setup, Box<dyn std::error::Error>> {
    let cluster = TestCluster::shared()?;
    let operator_port = operator(cluster)?;
    let client = cluster.client().await?;
    let namespace = cluster.namespace(&client, prefix).await?;
    let (exporter, exporter_port) = Exporter::start().await?;
    let prometheus = PrometheusServer::start(&[("serving", exporter_port)]).await?;
    let prometheus_port = prometheus.port;
    Ok(Setup {
        client,
        namespace,
        exporter,
        operator_port,
        prometheus,
        prometheus_port,
    })
}

async fn model_version(setup: &Setup, name: &str) -> TestResult {
    let mut version = example("modelversion.yaml")?;
    set(&mut version, "/metadata/name", json!(name));
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
fn rollout_manifest(setup: &Setup, version: &str, min_samples: u64) -> Value {
    json!({
        "apiVersion": "flywheel.dev/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": "ctr"},
        "spec": {
            "modelVersion": version,
            "serving": {"replicas": 1},
            "analysis": {
                "prometheus": format!("http://127.0.0.1:{}", setup.prometheus_port),
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

async fn rollout_status(setup: &Setup) -> Result<Value, Box<dyn std::error::Error>> {
    let api = api_for(&setup.client, "Rollout", &setup.namespace)?;
    let object: DynamicObject = api.get("ctr").await?;
    Ok(object.data.get("status").cloned().unwrap_or_default())
}

async fn wait_status(
    setup: &Setup,
    what: &str,
    limit: Duration,
    check: impl Fn(&Value) -> bool,
) -> Result<Value, Box<dyn std::error::Error>> {
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

async fn set_target(setup: &Setup, version: &str) -> TestResult {
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
async fn routes(setup: &Setup) -> Result<BTreeMap<String, u64>, Box<dyn std::error::Error>> {
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

async fn serving_from(setup: &Setup, version: &str) -> Result<Value, Box<dyn std::error::Error>> {
    // Analysis reads what Prometheus scraped: wait until every version the exporter has is there.
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

#[tokio::test]
async fn a_good_canary_walks_1_5_20_100_and_becomes_stable() -> TestResult {
    let setup = setup("rollout-good").await?;
    model_version(&setup, "ctr-v1").await?;
    model_version(&setup, "ctr-v2").await?;
    setup.exporter.set("ctr-v1", 0.80, 1.0, 50_000.0);
    setup.exporter.set("ctr-v2", 0.801, 1.01, 5_000.0);
    serving_from(&setup, "ctr-v1").await?;
    assert_eq!(
        routes(&setup).await?,
        BTreeMap::from([("ctr-v1".into(), 100)])
    );
    let deployments: Api<Deployment> = Api::namespaced(setup.client.clone(), &setup.namespace);
    assert!(
        deployments.get("ctr-ctr-v1").await.is_ok() && deployments.get("ctr-router").await.is_ok()
    );

    set_target(&setup, "ctr-v2").await?;
    let mut weights = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = rollout_status(&setup).await?;
        let weight = status["canaryWeight"].as_u64().unwrap_or(0);
        if weights.last() != Some(&weight) {
            weights.push(weight);
            if weight > 0 {
                let table = routes(&setup).await?;
                assert_eq!(
                    table.get("ctr-v2"),
                    Some(&weight),
                    "route table follows the weight: {table:?}"
                );
            }
        }
        if status["stableVersion"] == "ctr-v2" && status["phase"] == "Healthy" {
            break;
        }
        assert!(status["phase"] != "Degraded", "{status}");
        assert!(
            Instant::now() < deadline,
            "no promotion: {status}; weights {weights:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    weights.retain(|w| *w > 0);
    assert_eq!(weights, vec![1, 5, 20, 100]);
    let status = rollout_status(&setup).await?;
    assert!(
        status["measurements"]
            .as_array()
            .is_some_and(|m| m.len() >= 16),
        "2 rounds of 2 metrics per step"
    );
    assert_eq!(
        routes(&setup).await?,
        BTreeMap::from([("ctr-v2".into(), 100)])
    );
    let versions = api_for(&setup.client, "ModelVersion", &setup.namespace)?;
    let aliases = until(
        "production moved to ctr-v2",
        Duration::from_secs(10),
        || {
            let versions = versions.clone();
            async move {
                let v1 = versions.get("ctr-v1").await.map_err(|e| e.to_string())?;
                let v2 = versions.get("ctr-v2").await.map_err(|e| e.to_string())?;
                let aliases = (
                    v1.data["status"]["aliases"].clone(),
                    v2.data["status"]["aliases"].clone(),
                );
                (aliases.0.is_null() && aliases.1 == json!(["production"]))
                    .then_some(aliases.clone())
                    .ok_or(format!("{aliases:?}"))
            }
        },
    )
    .await?;
    assert_eq!(aliases.1, json!(["production"]));
    // The served version cannot be deleted while the Rollout serves it; the old one can.
    versions.delete("ctr-v2", &Default::default()).await?;
    let blocked = until("deletion blocked", Duration::from_secs(10), || {
        let versions = versions.clone();
        async move {
            let v2 = versions.get("ctr-v2").await.map_err(|e| e.to_string())?;
            let in_use = v2.data["status"]["conditions"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["type"] == "InUse"))
                .cloned()
                .unwrap_or_default();
            in_use["message"]
                .as_str()
                .filter(|m| m.starts_with("deletion waits"))
                .map(str::to_owned)
                .ok_or(in_use.to_string())
        }
    })
    .await?;
    assert!(blocked.contains("served by ctr (stable)"), "{blocked}");
    versions.delete("ctr-v1", &Default::default()).await?;
    until(
        "the unserved version deleted",
        Duration::from_secs(10),
        || {
            let versions = versions.clone();
            async move {
                match versions.get("ctr-v1").await {
                    Err(_) => Ok(()),
                    Ok(_) => Err("ctr-v1 still there".to_owned()),
                }
            }
        },
    )
    .await?;
    until(
        "the old version scaled down",
        Duration::from_secs(10),
        || {
            let deployments = deployments.clone();
            async move {
                match deployments.get("ctr-ctr-v1").await {
                    Err(_) => Ok(()),
                    Ok(_) => Err("ctr-ctr-v1 still there".to_owned()),
                }
            }
        },
    )
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_canary_2_percent_worse_is_rolled_back_at_the_first_failing_analysis() -> TestResult {
    let setup = setup("rollout-bad").await?;
    model_version(&setup, "ctr-v1").await?;
    model_version(&setup, "ctr-v2").await?;
    setup.exporter.set("ctr-v1", 0.80, 1.0, 50_000.0);
    setup.exporter.set("ctr-v2", 0.78, 1.0, 5_000.0);
    serving_from(&setup, "ctr-v1").await?;
    set_target(&setup, "ctr-v2").await?;
    let status = wait_status(&setup, "the canary aborted", Duration::from_secs(30), |s| {
        s["phase"] == "Degraded"
    })
    .await?;
    assert_eq!(status["canaryWeight"], 0);
    assert_eq!(status["stableVersion"], "ctr-v1");
    assert_eq!(status["failedMeasurements"], 1, "{status}");
    let reason = status["abortReason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("auc-drop = 0.02") && reason.contains("> max 0.005"),
        "{reason}"
    );
    assert_eq!(
        routes(&setup).await?,
        BTreeMap::from([("ctr-v1".into(), 100)])
    );
    let failing = status["measurements"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["verdict"] == "Failed"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(failing["metric"], "auc-drop");
    Ok(())
}

#[tokio::test]
async fn a_firing_alert_from_the_webhook_aborts_within_a_second() -> TestResult {
    let setup = setup("rollout-alert").await?;
    model_version(&setup, "ctr-v1").await?;
    model_version(&setup, "ctr-v2").await?;
    setup.exporter.set("ctr-v1", 0.80, 1.0, 50_000.0);
    setup.exporter.set("ctr-v2", 0.80, 1.0, 5_000.0);
    serving_from(&setup, "ctr-v1").await?;
    set_target(&setup, "ctr-v2").await?;
    wait_status(&setup, "the canary at 1%", Duration::from_secs(30), |s| {
        s["canaryWeight"] == 1
    })
    .await?;
    let notification = json!({
        "version": "4",
        "status": "firing",
        "alerts": [{
            "status": "firing",
            "labels": {"alertname": "FlywheelCalibrationDeviation", "namespace": setup.namespace, "rollout": "ctr", "severity": "critical"},
        }],
    });
    let sent = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", setup.operator_port)).await?;
    let body = notification.to_string();
    stream
        .write_all(
            format!(
                "POST /webhook/alertmanager HTTP/1.0\r\nHost: operator\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    assert!(
        answer.starts_with("HTTP/1.0 200") || answer.starts_with("HTTP/1.1 200"),
        "{answer}"
    );
    let status = wait_status(
        &setup,
        "aborted by the alert",
        Duration::from_secs(5),
        |s| s["phase"] == "Degraded",
    )
    .await?;
    let reacted = sent.elapsed();
    assert_eq!(
        routes(&setup).await?,
        BTreeMap::from([("ctr-v1".into(), 100)])
    );
    assert!(reacted < Duration::from_secs(1), "abort took {reacted:?}");
    assert_eq!(
        status["abortReason"],
        "alert FlywheelCalibrationDeviation is firing"
    );
    Ok(())
}

#[tokio::test]
async fn too_few_labels_or_nan_pause_instead_of_rolling_back() -> TestResult {
    let setup = setup("rollout-inconclusive").await?;
    model_version(&setup, "ctr-v1").await?;
    model_version(&setup, "ctr-v2").await?;
    setup.exporter.set("ctr-v1", 0.80, 1.0, 50_000.0);
    setup.exporter.set("ctr-v2", f64::NAN, f64::NAN, 10.0);
    serving_from(&setup, "ctr-v1").await?;
    set_target(&setup, "ctr-v2").await?;
    let status = wait_status(
        &setup,
        "paused on inconclusive analysis",
        Duration::from_secs(30),
        |s| s["phase"] == "Paused",
    )
    .await?;
    assert_eq!(
        status["canaryWeight"], 1,
        "the canary keeps its weight, it is not rolled back"
    );
    assert!(
        status["pauseReason"]
            .as_str()
            .unwrap_or_default()
            .contains("inconclusive 3 times"),
        "{status}"
    );
    assert!(
        status["measurements"]
            .as_array()
            .is_some_and(|m| m.iter().all(|m| m["verdict"] == "Inconclusive"))
    );
    // Enough labels now, and the human retries: the analysis resumes and the canary moves on.
    setup.exporter.set("ctr-v2", 0.80, 1.0, 5_000.0);
    let api = api_for(&setup.client, "Rollout", &setup.namespace)?;
    api.patch(
        "ctr",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"annotations": {"flywheel.dev/action": "promote"}}})),
    )
    .await?;
    wait_status(
        &setup,
        "moved on after promote",
        Duration::from_secs(30),
        |s| s["canaryWeight"].as_u64().is_some_and(|w| w >= 5),
    )
    .await?;
    Ok(())
}
