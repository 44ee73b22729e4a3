//! FeatureViews on the real node: the operator installed by the chart schedules materialization Jobs, whose
//! pods (trainer image) read the source from the namespace's volume and write the offline table there and the
//! online features into a real Redis on the node's address. Status from the Job's report, drift, the
//! ingestion Deployment whose pod consumes the view's topic on a Kafka-protocol broker (tansu) on the node's
//! address into the same Redis, and a spec the operator refuses.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use flywheel_crds::FeatureView;
use flywheel_e2e::on_node::{self, NODE_IP, STORAGE, namespace_with_storage};
use flywheel_e2e::serving::{Broker, Redis};
use flywheel_e2e::wait::until;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use kube::api::{ListParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

fn generate(out: &Path, extra: &[&str]) -> Result<(), Box<dyn std::error::Error>> {
    let output = Command::new(flywheel_e2e::bin_dir().join("flywheel-trainer"))
        .args(["generate-events", "--users", "400", "--labels", "10"])
        .args(extra)
        .arg("--out")
        .arg(out)
        .output()?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned().into());
    }
    std::fs::remove_file(out.join("labels.parquet"))?;
    Ok(())
}

fn condition(view: &FeatureView, type_: &str) -> Option<(String, String)> {
    view.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.message.clone()))
}

#[tokio::test]
async fn scheduled_materialization_reports_runs_and_drift() -> TestResult {
    let cluster = on_node::operator(&[]).await?;
    let client = cluster.client().await?;
    let (namespace, storage) = namespace_with_storage(cluster, &client, "fv").await?;
    // Redis stands outside the cluster, as a managed store would; pods reach it on the node's address.
    let bind = format!("127.0.0.1 {NODE_IP}");
    let staging = cluster.state_dir().join(format!("{namespace}-staging"));
    std::fs::create_dir_all(&staging)?;
    let redis = Redis::start_with(&staging, &["--bind", &bind, "--protected-mode", "no"]).await?;
    // So does the Kafka-protocol broker the view's stream comes from.
    let broker = Broker::start_on(&staging, NODE_IP).await?;
    broker.create_topic("user-events")?;
    // The source lands on the volume the way a data pipeline would drop it there.
    let source = storage.join("source");
    let now = jiff::Timestamp::now();
    let hour_ago = now
        .checked_sub(jiff::SignedDuration::from_hours(1))?
        .to_string();
    generate(
        &source,
        &["--events", "20000", "--span", "1d", "--end", &hour_ago],
    )?;

    let views: Api<FeatureView> = Api::namespaced(client.clone(), &namespace);
    let manifest: FeatureView = serde_json::from_value(json!({
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "FeatureView",
        "metadata": {"name": "users"},
        "spec": {
            "entities": [{"name": "user", "joinKey": "user_id", "valueType": "Int64"}],
            "source": {
                "batch": {"uri": format!("file://{STORAGE}/source"), "timestampField": "event_timestamp"},
                "stream": {"brokers": [broker.address], "topic": "user-events", "timestampField": "event_timestamp"},
            },
            "features": [
                {"name": "price", "valueType": "Float64"},
                {"name": "clicks", "valueType": "Int64"},
                {"name": "events_1d", "column": "price", "valueType": "Int64",
                 "aggregation": {"function": "count", "window": "1d"}},
            ],
            "ttl": "2d",
            "offline": {"uri": format!("file://{STORAGE}/offline")},
            "online": {"redis": {"address": format!("{NODE_IP}:{}", redis.port)}},
            "materialization": {"schedule": "@every 15s"},
        },
    }))?;
    views.create(&PostParams::default(), &manifest).await?;

    let views_ref = &views;
    let first = until(
        "the first materialization is reported",
        Duration::from_secs(120),
        || async move {
            let view = views_ref.get("users").await.map_err(|e| e.to_string())?;
            let run = view
                .status
                .as_ref()
                .and_then(|s| s.last_materialization.clone());
            match run {
                Some(run) if run.rows > 0 => Ok(view),
                _ => Err(format!("{:?}", view.status)),
            }
        },
    )
    .await?;
    let status = first.status.clone().unwrap_or_default();
    let run = status
        .last_materialization
        .clone()
        .unwrap_or_else(|| panic!("no run"));
    assert_eq!((run.rows, run.entities_written), (20000, 400), "{run:?}");
    assert!(run.watermark.is_some());
    assert_eq!(status.schema_hash, Some(first.spec.schema_hash()));
    assert_eq!(
        status.statistics.len(),
        3,
        "baseline statistics: {:?}",
        status.statistics
    );
    assert_eq!(
        condition(&first, "Materialized").map(|c| c.0).as_deref(),
        Some("True")
    );
    assert_eq!(
        condition(&first, "Drifted").map(|c| c.0).as_deref(),
        Some("False")
    );
    assert_eq!(redis.command(&["dbsize"])?.trim(), "400");

    // The ingestion Deployment runs while the view has a stream source, owned by the view.
    let deployment = Api::<Deployment>::namespaced(client.clone(), &namespace)
        .get("users-ingest")
        .await?;
    assert_eq!(
        deployment
            .owner_references()
            .first()
            .map(|o| o.name.as_str()),
        Some("users")
    );
    let container =
        serde_json::to_value(&deployment)?["spec"]["template"]["spec"]["containers"][0].clone();
    assert_eq!(container["args"], json!(["ingest"]));
    let view_env: Value = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|e| e["name"] == "FLYWHEEL_FEATURE_VIEW")
        .and_then(|e| serde_json::from_str(e["value"].as_str()?).ok())
        .unwrap_or_default();
    assert_eq!(view_env["spec"]["source"]["stream"]["topic"], "user-events");

    // Its pod consumes the view's topic: an event of a user the batch never saw reaches the online store.
    let producer: rdkafka::producer::FutureProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .create()?;
    let event = json!({
        "event_id": "stream-1", "user_id": 100_000, "price": 12.5, "clicks": 2,
        "event_timestamp": jiff::Timestamp::now().as_second() as f64,
    })
    .to_string();
    producer
        .send(
            rdkafka::producer::FutureRecord::to("user-events")
                .payload(&event)
                .key("100000"),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    let key = format!("{namespace}/users:100000");
    let redis_ref = &redis;
    let streamed = until(
        "the ingestion pod to write the streamed event",
        Duration::from_secs(120),
        || {
            let key = key.clone();
            async move {
                let price = redis_ref
                    .command(&["hget", &key, "price"])
                    .map_err(|e| e.to_string())?;
                match price.trim() {
                    "" => Err("not yet".to_owned()),
                    price => Ok(price.to_owned()),
                }
            }
        },
    )
    .await?;
    assert_eq!(streamed.parse::<f64>()?, 12.5);
    assert_eq!(
        redis.command(&["hget", &key, "events_1d"])?.trim(),
        "1",
        "the window counts the one event"
    );

    // Newer events with prices shifted up: the next scheduled run reads only them and reports drift.
    generate(
        &staging.join("shifted"),
        &[
            "--events",
            "4000",
            "--span",
            "30m",
            "--price-shift",
            "40",
            "--seed",
            "3",
        ],
    )?;
    std::fs::rename(
        staging.join("shifted/events.parquet"),
        source.join("shifted.parquet"),
    )?;
    let first_job = run.job.clone();
    let drifted = until(
        "the next run reports drift",
        Duration::from_secs(120),
        || {
            let first_job = first_job.clone();
            async move {
                let view = views_ref.get("users").await.map_err(|e| e.to_string())?;
                let run = view
                    .status
                    .as_ref()
                    .and_then(|s| s.last_materialization.clone());
                match (run, condition(&view, "Drifted")) {
                    (Some(run), Some((state, message)))
                        if run.job != first_job && state == "True" =>
                    {
                        Ok((run, message))
                    }
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await?;
    assert_eq!(
        drifted.0.rows, 4000,
        "only events after the watermark: {:?}",
        drifted.0
    );
    assert!(drifted.1.contains("price (PSI"), "{}", drifted.1);
    assert!(!drifted.1.contains("clicks"), "{}", drifted.1);

    // Runs are Jobs of the view; finished ones beyond the history are pruned.
    let jobs = Api::<Job>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default().labels("flywheel.dev/feature-view=users"))
        .await?;
    assert!(
        (2..=4).contains(&jobs.items.len()),
        "{} jobs",
        jobs.items.len()
    );
    Ok(())
}

#[tokio::test]
async fn a_feature_whose_type_cannot_hold_its_aggregation_is_invalid() -> TestResult {
    let cluster = on_node::operator(&[]).await?;
    let client = cluster.client().await?;
    let namespace = cluster.namespace(&client, "fv-bad").await?;
    let views: Api<FeatureView> = Api::namespaced(client.clone(), &namespace);
    let manifest: FeatureView = serde_json::from_value(json!({
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "FeatureView",
        "metadata": {"name": "bad"},
        "spec": {
            "entities": [{"name": "user", "joinKey": "user_id"}],
            "source": {"batch": {"uri": "file:///nowhere", "timestampField": "t"}},
            "features": [{"name": "n", "valueType": "Float64", "aggregation": {"function": "count", "window": "1h"}}],
            "ttl": "1d",
            "offline": {"uri": "file:///nowhere/offline"},
        },
    }))?;
    views.create(&PostParams::default(), &manifest).await?;
    let views_ref = &views;
    let message = until("InvalidSpec", Duration::from_secs(60), || async move {
        let view = views_ref.get("bad").await.map_err(|e| e.to_string())?;
        match condition(&view, "InvalidSpec") {
            Some((state, message)) if state == "True" => Ok(message),
            other => Err(format!("{other:?}")),
        }
    })
    .await?;
    assert!(
        message.starts_with("spec.features[0].valueType: is Float64 but the feature yields Int64"),
        "{message}"
    );
    let jobs = Api::<Job>::namespaced(client.clone(), &namespace)
        .list(&ListParams::default())
        .await?;
    assert!(jobs.items.is_empty(), "an invalid view runs nothing");
    Ok(())
}
