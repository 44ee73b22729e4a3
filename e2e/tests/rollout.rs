//! Rollouts against a real kube-apiserver and a real Prometheus (Debian's) scraping an exporter of the serving
//! metrics whose values each test sets: progressions, aborts on analysis and on an Alertmanager webhook,
//! inconclusive analysis, aliases and the in-use finalizer, and the route table the router reads.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use flywheel_e2e::fixtures::api_for;
use flywheel_e2e::on_node;
use flywheel_e2e::rollouts::{
    CANARY_UP, Setup, model_version, rollout_status, routes, serving_from, set_target,
    unservable_model_version, wait_status,
};
use flywheel_e2e::wait::until;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type TestResult = Result<(), Box<dyn std::error::Error>>;

async fn setup(prefix: &str) -> Result<Setup, Box<dyn std::error::Error>> {
    Setup::start(prefix).await
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
    let deadline = Instant::now() + CANARY_UP;
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
    let status = wait_status(&setup, "the canary aborted", CANARY_UP, |s| {
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
async fn a_canary_that_never_becomes_available_gets_no_traffic_and_is_aborted_at_its_deadline()
-> TestResult {
    let setup = setup("rollout-unavailable").await?;
    model_version(&setup, "ctr-v1").await?;
    unservable_model_version(&setup, "ctr-v2").await?;
    setup.exporter.set("ctr-v1", 0.80, 1.0, 50_000.0);
    setup.exporter.set("ctr-v2", 0.80, 1.0, 50_000.0);
    serving_from(&setup, "ctr-v1").await?;
    api_for(&setup.client, "Rollout", &setup.namespace)?
        .patch(
            "ctr",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "modelVersion": "ctr-v2",
                "strategy": {"canary": {"progressDeadline": "15s"}},
            }})),
        )
        .await?;
    // Every poll: the canary never had a weight, and the router never sent it anything.
    let started = Instant::now();
    let mut waited_for_pods = false;
    let status = loop {
        let status = rollout_status(&setup).await?;
        assert_eq!(status["canaryWeight"], 0, "{status}");
        assert_eq!(
            routes(&setup).await?,
            BTreeMap::from([("ctr-v1".into(), 100)])
        );
        waited_for_pods |= status["waitingFor"]
            .as_str()
            .is_some_and(|w| w.starts_with("ctr-v2 to be available"));
        if status["phase"] == "Degraded" {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "not aborted: {status}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(waited_for_pods, "the status said what the step waited for");
    let reason = status["abortReason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("ctr-v2 did not become available within the progress deadline (15s): 0/1 pods available; ctr-ctr-v2-")
            && reason.contains("not ready"),
        "{reason}"
    );
    assert!(started.elapsed() >= Duration::from_secs(15));
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
    // The canary is healthy; many analysis rounds per step hold it at 1% until the alert comes, so a slow poll
    // on a loaded machine cannot see it already promoted.
    api_for(&setup.client, "Rollout", &setup.namespace)?
        .patch(
            "ctr",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"modelVersion": "ctr-v2", "analysis": {"count": 600}}})),
        )
        .await?;
    wait_status(&setup, "the canary at 1%", CANARY_UP, |s| {
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
    let operator = on_node::leader_address(&setup.client).await?;
    let authorization = on_node::webhook_authorization(&setup.client).await?;
    let body = notification.to_string();
    let notify = |authorization: Option<String>| {
        let body = body.clone();
        async move {
            let header = authorization
                .map(|value| format!("Authorization: {value}\r\n"))
                .unwrap_or_default();
            let mut stream = tokio::net::TcpStream::connect(operator).await?;
            stream
                .write_all(
                    format!(
                        "POST /webhook/alertmanager HTTP/1.0\r\nHost: operator\r\n{header}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await?;
            Ok::<_, std::io::Error>(answer)
        }
    };
    // Without the webhook token (or with another) nobody aborts a canary.
    for refused in [None, Some(format!("Bearer {}", "0".repeat(64)))] {
        let answer = notify(refused).await?;
        assert!(answer.contains(" 401 "), "{answer}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let status = wait_status(&setup, "still at 1%", Duration::from_secs(5), |s| {
        s["canaryWeight"] == 1
    })
    .await?;
    assert_eq!(status["phase"], "Progressing", "{status}");
    let sent = Instant::now();
    let answer = notify(Some(authorization)).await?;
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
    let status = wait_status(&setup, "paused on inconclusive analysis", CANARY_UP, |s| {
        s["phase"] == "Paused"
    })
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
