//! Rollout benchmark against a real kube-apiserver, the real operator (`FLYWHEEL_BIN_DIR`, build it with
//! `--release`) and a real Prometheus scraping an exporter of serving metrics:
//!
//! 1. rollback reaction time, twice: an Alertmanager webhook call → canary weight 0 in the router's route table,
//!    and a failing sample scraped by Prometheus → weight 0 (analysis every second);
//! 2. N Rollouts (default 1000) created at once: time until every one serves its version, reconciles per second
//!    and the operator's memory.
//!
//! ```sh
//! scripts/bench-rollout.sh [ROLLOUTS]
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use flywheel_crds::Rollout;
use flywheel_crds::rollout::RolloutPhase;
use flywheel_e2e::cluster::TestCluster;
use flywheel_e2e::fixtures::api_for;
use flywheel_e2e::operator::OperatorProcess;
use flywheel_e2e::rollouts::{Setup, model_version, routes, serving_from, set_target, wait_status};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ROUNDS: usize = 5;
const CONCURRENT_CREATES: usize = 32;

fn boxed(err: Box<dyn std::error::Error>) -> anyhow::Error {
    anyhow::anyhow!("{err}")
}

async fn webhook(operator: &OperatorProcess, namespace: &str, status: &str) -> anyhow::Result<()> {
    let body = json!({"version": "4", "alerts": [{"status": status, "labels": {
        "alertname": "FlywheelCalibrationDeviation", "namespace": namespace, "rollout": "ctr"}}]})
    .to_string();
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", operator.http_port)).await?;
    stream
        .write_all(format!("POST /webhook/alertmanager HTTP/1.0\r\nHost: o\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", operator.webhook_authorization, body.len()).as_bytes())
        .await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    if !answer.contains(" 200 ") {
        bail!("webhook answered {answer}");
    }
    Ok(())
}

/// Polls the route table every 5 ms until the canary has no weight; the time it took.
async fn until_rolled_back(setup: &Setup, since: Instant) -> anyhow::Result<Duration> {
    let stable = BTreeMap::from([("ctr-v1".to_owned(), 100)]);
    loop {
        if routes(setup).await.map_err(boxed)? == stable {
            return Ok(since.elapsed());
        }
        if since.elapsed() > Duration::from_secs(30) {
            bail!("no rollback within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn restart_progression(setup: &Setup, round: usize) -> anyhow::Result<()> {
    let api = api_for(&setup.client, "Rollout", &setup.namespace)?;
    api.patch(
        "ctr",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"metadata": {"annotations": {"flywheel.dev/action": format!("retry:{round}")}}}),
        ),
    )
    .await?;
    wait_status(setup, "canary at 1%", Duration::from_secs(30), |s| {
        s["canaryWeight"] == 1
    })
    .await
    .map_err(boxed)?;
    Ok(())
}

/// Polls Prometheus every 5 ms until the canary's online AUC is `value`; the moment it was seen.
async fn until_scraped(setup: &Setup, value: f64) -> anyhow::Result<Instant> {
    let since = Instant::now();
    loop {
        let series = setup
            .prometheus
            .query("flywheel_serving_online_auc{version=\"ctr-v2\"}")
            .await?;
        let seen = series
            .first()
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse::<f64>().ok());
        if seen == Some(value) {
            return Ok(Instant::now());
        }
        if since.elapsed() > Duration::from_secs(30) {
            bail!("Prometheus never saw {value}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// This cluster has no node: nothing runs the canary's pods, and the operator moves a canary's weight only
/// while its Deployment reports every replica available. The benchmark reports it so, as a kubelet and the
/// deployment controller would, to measure the operator alone.
fn keep_canary_available(client: kube::Client, namespace: String) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let api: Api<Deployment> = Api::namespaced(client, &namespace);
        loop {
            if let Ok(Some(deployment)) = api.get_opt("ctr-ctr-v2").await {
                let generation = deployment.metadata.generation.unwrap_or(1);
                let status = json!({"status": {
                    "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1,
                    "observedGeneration": generation,
                }});
                let _ = api
                    .patch_status(
                        "ctr-ctr-v2",
                        &PatchParams::default(),
                        &Patch::Merge(&status),
                    )
                    .await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

fn summary(samples: &mut [Duration]) -> String {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "{:.0} ms | {:.0} ms | {:.0} ms",
        ms(samples[0]),
        ms(samples[samples.len() / 2]),
        ms(samples[samples.len() - 1])
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rollouts: usize = std::env::args()
        .nth(1)
        .map(|n| n.parse())
        .transpose()
        .context("ROLLOUTS must be a number")?
        .unwrap_or(1000);
    let cluster = TestCluster::shared().map_err(anyhow::Error::msg)?;
    let mut operator = OperatorProcess::spawn(cluster, "bench-rollout", &["--no-leader-election"])?;
    let setup = Setup::in_cluster(cluster, "bench-rollout", std::net::Ipv4Addr::LOCALHOST)
        .await
        .map_err(boxed)?;
    model_version(&setup, "ctr-v1").await.map_err(boxed)?;
    model_version(&setup, "ctr-v2").await.map_err(boxed)?;
    setup.exporter.set("ctr-v1", 0.80, 1.0, 50_000.0);
    setup.exporter.set("ctr-v2", 0.80, 1.0, 5_000.0);
    serving_from(&setup, "ctr-v1").await.map_err(boxed)?;
    let available = keep_canary_available(setup.client.clone(), setup.namespace.clone());
    set_target(&setup, "ctr-v2").await.map_err(boxed)?;
    wait_status(&setup, "canary at 1%", Duration::from_secs(30), |s| {
        s["canaryWeight"] == 1
    })
    .await
    .map_err(boxed)?;

    let mut by_webhook = Vec::new();
    for round in 0..ROUNDS {
        if round > 0 {
            webhook(&operator, &setup.namespace, "resolved").await?;
            restart_progression(&setup, round).await?;
        }
        let sent = Instant::now();
        webhook(&operator, &setup.namespace, "firing").await?;
        by_webhook.push(until_rolled_back(&setup, sent).await?);
    }
    webhook(&operator, &setup.namespace, "resolved").await?;

    let mut by_sample = Vec::new();
    let mut by_change = Vec::new();
    for round in 0..ROUNDS {
        setup.exporter.set("ctr-v2", 0.80, 1.0, 5_000.0);
        until_scraped(&setup, 0.80).await?;
        restart_progression(&setup, ROUNDS + round).await?;
        let changed = Instant::now();
        setup.exporter.set("ctr-v2", 0.78, 1.0, 5_000.0);
        // The failing sample is in Prometheus from the first query that sees it.
        let scraped = until_scraped(&setup, 0.78).await?;
        let rolled_back = until_rolled_back(&setup, scraped).await?;
        by_sample.push(rolled_back);
        by_change.push(changed.elapsed());
    }

    println!();
    println!("| rollback reaction ({ROUNDS} rounds) | min | median | max |");
    println!("|---|---|---|---|");
    println!(
        "| Alertmanager webhook received → canary weight 0 in the route table | {} |",
        summary(&mut by_webhook)
    );
    println!(
        "| failing sample in Prometheus → weight 0 (analysis interval 1 s) | {} |",
        summary(&mut by_sample)
    );
    println!(
        "| metric changed at the exporter → weight 0 (adds the 1 s scrape) | {} |",
        summary(&mut by_change)
    );

    available.abort();

    // Many Rollouts at once.
    let namespace = setup.namespace.clone();
    let before = operator.reconciliations().await?;
    let api: Api<Rollout> = Api::namespaced(setup.client.clone(), &namespace);
    let started = Instant::now();
    let created = futures::stream::iter(0..rollouts)
        .map(|i| {
            let api = api.clone();
            async move {
                let rollout: Rollout = serde_json::from_value(json!({
                    "apiVersion": "flywheel.dev/v1alpha1", "kind": "Rollout",
                    "metadata": {"name": format!("endpoint-{i:05}")},
                    "spec": {"modelVersion": "ctr-v1", "serving": {"replicas": 1}},
                }))?;
                api.create(&PostParams::default(), &rollout).await?;
                anyhow::Ok(())
            }
        })
        .buffered(CONCURRENT_CREATES)
        .collect::<Vec<_>>()
        .await;
    for result in created {
        result?;
    }
    let applied = started.elapsed();
    let mut peak_rss = 0;
    let settled = loop {
        peak_rss = peak_rss.max(operator.memory_kib("VmRSS")?);
        let list = api.list(&ListParams::default()).await?.items;
        let healthy = list
            .iter()
            .filter(|r| {
                r.status
                    .as_ref()
                    .is_some_and(|s| s.phase == Some(RolloutPhase::Healthy))
            })
            .count();
        // `ctr` itself is Degraded by the rounds above.
        if healthy >= rollouts {
            break started.elapsed();
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("{healthy} of {rollouts} Rollouts healthy after 600 s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let reconciles = operator.reconciliations().await? - before;
    let high_water = operator.memory_kib("VmHWM")?;
    println!();
    println!(
        "| rollouts | applied in | all serving after | reconciles | reconciles/s | operator RSS (peak) |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {rollouts} | {:.1} s | {:.1} s | {reconciles} | {:.0} | {:.1} MiB ({:.1} MiB) |",
        applied.as_secs_f64(),
        settled.as_secs_f64(),
        reconciles as f64 / settled.as_secs_f64(),
        peak_rss as f64 / 1024.0,
        high_water as f64 / 1024.0,
    );
    operator.kill();
    Ok(())
}
