//! The lifecycle on a real node, as a user runs it: a model trained by a gang of trainer-image pods (the
//! operator installed by the chart) is served by a Rollout's serving and router pods (serving image) and
//! answers through the Rollout's Service, the model read from the claim the gang wrote it to. The next
//! TrainingJobs state gates against the version holding `production`, and the versions they create are
//! validated or rejected by them. With three serving replicas and a clicks topic, every label reaches the
//! replica that served its prediction; the Rollout's traffic log writes what was served, and a TrainingJob on
//! that served traffic trains the next model.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use flywheel_crds::modelversion::ModelVersionPhase;
use flywheel_crds::trainingjob::TrainingPhase;
use flywheel_crds::{ModelVersion, TrainingJob};
use flywheel_e2e::fixtures::{api_for, condition};
use flywheel_e2e::http::http_get_at;
use flywheel_e2e::on_node::{
    self, NODE_IP, STORAGE, generate_training_data, namespace_with_storage,
};
use flywheel_e2e::serving::{Broker, HttpClient, metric, rest_body};
use flywheel_e2e::training_jobs::{finished, job_until};
use flywheel_e2e::wait::until;
use flywheel_ml::synthetic::{SyntheticConfig, generate};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
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
    let (namespace, volume) = namespace_with_storage(cluster, &client, "serve-node").await?;
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

    // The Rollout's NetworkPolicy covers all its pods; only its router, the operator and scrapers reach the
    // admin port (the node's bridge plugin does not enforce it; the selectors are what a real plugin reads).
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &namespace);
    let policy = until("the Rollout's NetworkPolicy", SETTLE, || {
        let policies = policies.clone();
        async move {
            policies
                .get_opt("ctr-network")
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "not yet".to_owned())
        }
    })
    .await?;
    let spec = policy.spec.unwrap_or_default();
    assert_eq!(
        spec.pod_selector
            .and_then(|s| s.match_labels)
            .unwrap_or_default()
            .get("flywheel.dev/rollout")
            .map(String::as_str),
        Some("ctr")
    );
    let admin_sources = spec
        .ingress
        .unwrap_or_default()
        .into_iter()
        .find(|rule| rule.from.is_some())
        .and_then(|rule| rule.from)
        .unwrap_or_default();
    assert_eq!(admin_sources.len(), 4, "{admin_sources:?}");

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
    nobody_without_the_token_changes_what_is_served(&client, &namespace).await?;

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

    // Labels come back through Kafka to every replica: the Rollout names a clicks topic, its three serving
    // pods each read all of it and label the predictions they served.
    let staging = cluster.state_dir().join(format!("{namespace}-kafka"));
    std::fs::create_dir_all(&staging)?;
    let broker = Broker::start_on(&staging, NODE_IP).await?;
    broker.create_topic("clicks")?;
    broker.create_topic("predictions")?;
    rollouts
        .patch(
            "ctr",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "serving": {"replicas": 3},
                "feedback": {
                    "brokers": [broker.address], "clicksTopic": "clicks",
                    "predictionLogTopic": "predictions",
                    "trafficLog": {"uri": format!("file://{STORAGE}/traffic"), "flushInterval": "2s"},
                },
            }})),
        )
        .await?;
    // The sink reached the brokers and runs: the Rollout says so.
    until("the Rollout's TrafficLogged condition", TRAINING, || {
        let rollouts = rollouts.clone();
        async move {
            let rollout = rollouts.get("ctr").await.map_err(|e| e.to_string())?;
            match condition(&rollout, "TrafficLogged") {
                Some((status, reason, ..)) if status == "True" && reason == "Logging" => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await?;
    let replicas = until(
        "three serving pods reading the clicks topic",
        TRAINING,
        || {
            let client = client.clone();
            let namespace = namespace.clone();
            async move { feedback_replicas(&client, &namespace).await }
        },
    )
    .await?;
    let producer: rdkafka::producer::FutureProducer = rdkafka::config::ClientConfig::new()
        .set("bootstrap.servers", &broker.address)
        .create()?;
    let click = |id: String, clicked: bool| {
        let producer = producer.clone();
        async move {
            let payload = json!({"requestId": id, "clicked": clicked}).to_string();
            producer
                .send(
                    rdkafka::producer::FutureRecord::to("clicks")
                        .payload(&payload)
                        .key(&id),
                    Duration::from_secs(10),
                )
                .await
                .map(|_| ())
                .map_err(|(e, _)| e.to_string())
        }
    };
    // A replica's consumer reads from the newest offset once it has joined: until every one has read a click
    // for nobody's prediction, clicks are sent to probe.
    let mut probes = 0;
    until("every replica's consumer to read the topic", SETTLE, || {
        probes += 1;
        let probe = click(format!("probe-{probes}"), true);
        let replicas = replicas.clone();
        async move {
            probe.await?;
            for ip in &replicas {
                let counts = kafka_feedback(*ip).await?;
                if counts.1 < 1.0 {
                    return Err(format!("{ip} has read no click yet"));
                }
            }
            Ok(())
        }
    })
    .await?;
    let before: Vec<(f64, f64)> = {
        let mut counts = Vec::new();
        for ip in &replicas {
            counts.push(kafka_feedback(*ip).await?);
        }
        counts
    };
    let labeled = 900;
    // Range bounds are whole seconds (metav1.Time): the split is the next second, passed before the second half.
    let whole_second = |offset: i64| {
        jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() + offset)
            .map_err(|e| e.to_string())
    };
    let served_from = whole_second(0)?;
    let mut split = served_from;
    for i in 0..labeled {
        if i == labeled / 2 {
            split = whole_second(1)?;
            tokio::time::sleep(Duration::from_millis(1_200)).await;
        }
        let id = format!("fb-{i}");
        let body = rest_body(Some(&id), &rows[i % rows.len()..i % rows.len() + 1])
            .to_string()
            .into_bytes();
        let user = format!("u-{i}");
        let (code, answer) = http
            .send_to(
                "POST",
                SocketAddr::from((cluster_ip, 8080)),
                "/v2/models/ctr/infer",
                Some(body),
                &[("x-user-id", &user)],
            )
            .await?;
        assert_eq!(code, 200, "{answer}");
        click(id, i % 3 == 0).await?;
    }
    let after = until("every label to reach the replica that served it", SETTLE, || {
        let replicas = replicas.clone();
        let before = before.clone();
        async move {
            let mut counts = Vec::new();
            for ip in &replicas {
                counts.push(kafka_feedback(*ip).await?);
            }
            let matched: f64 = counts.iter().zip(&before).map(|(a, b)| a.0 - b.0).sum();
            let every_replica_read_all = counts
                .iter()
                .zip(&before)
                .all(|(a, b)| (a.0 - b.0) + (a.1 - b.1) >= labeled as f64);
            if matched == labeled as f64 && every_replica_read_all {
                Ok(counts)
            } else {
                Err(format!("matched {matched} of {labeled}; (matched, unmatched) per replica {counts:?}"))
            }
        }
    })
    .await?;
    eprintln!("(matched, unmatched) clicks per replica, probes included: {after:?}");
    next_model_from_served_traffic(
        &client,
        &namespace,
        &volume,
        (served_from, split),
        |body| {
            let http = http.clone();
            async move {
                http.send_to(
                    "POST",
                    SocketAddr::from((cluster_ip, 8080)),
                    "/v2/models/ctr/infer",
                    Some(body),
                    &[("x-user-id", "late")],
                )
                .await
                .map(|(code, _)| code)
                .map_err(|e| e.to_string())
            }
        },
        rest_body(Some("late"), &rows[..1]).to_string().into_bytes(),
    )
    .await
}

/// Predictions are labeled by the clicks that arrive within this long.
const CLICK_WINDOW: Duration = Duration::from_secs(5);

/// The Rollout's traffic log holds every prediction served since `served_from`; a TrainingJob on the Rollout's
/// served traffic trains on the first half (before `split`) and evaluates on the second, and its ModelVersion
/// names the Rollout. A last prediction, sent once the others' click windows closed, ends the log.
async fn next_model_from_served_traffic<F, Fut>(
    client: &Client,
    namespace: &str,
    volume: &std::path::Path,
    (served_from, split): (jiff::Timestamp, jiff::Timestamp),
    infer: F,
    late_body: Vec<u8>,
) -> TestResult
where
    F: Fn(Vec<u8>) -> Fut,
    Fut: std::future::Future<Output = Result<u16, String>>,
{
    tokio::time::sleep(CLICK_WINDOW + Duration::from_secs(1)).await;
    assert_eq!(infer(late_body).await?, 200);
    let logged = volume.join("traffic").join("predictions");
    until(
        "the traffic log's sink to write every prediction",
        SETTLE,
        || {
            let logged = logged.clone();
            async move {
                let rows = logged_rows(&logged);
                (rows >= 901)
                    .then_some(())
                    .ok_or(format!("{rows} predictions in {}", logged.display()))
            }
        },
    )
    .await?;
    let end = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() + 3_600)?;
    let mut spec = job("ctr-traffic", json!({"single": {}}));
    spec["spec"]["data"] = json!({"servedTraffic": {
        "rollout": "ctr",
        "clickWindow": format!("{}s", CLICK_WINDOW.as_secs()),
        "trainRange": {"start": served_from.to_string(), "end": split.to_string()},
        "evalRange": {"start": split.to_string(), "end": end.to_string()},
    }});
    spec["spec"]["epochs"] = json!(3);
    // The next model is searched for: three trials in the training pod, the trials table in the status.
    spec["spec"]["earlyStopping"] = json!({"validationFraction": 0.5});
    spec["spec"]["tuning"] = json!({"trials": 3, "space": {
        "learningRate": {"min": 0.0005, "max": 0.02}, "embeddingDim": [4, 8],
    }});
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), namespace);
    jobs.create(&PostParams::default(), &serde_json::from_value(spec)?)
        .await?;
    let done = job_until(
        client,
        namespace,
        "ctr-traffic",
        "to finish",
        TRAINING,
        finished,
    )
    .await?;
    let status = done.status.unwrap_or_default();
    assert_eq!(status.phase, Some(TrainingPhase::Succeeded), "{status:?}");
    let built = status
        .conditions
        .iter()
        .find(|c| c.type_ == "DatasetBuilt")
        .ok_or("no DatasetBuilt condition")?;
    assert_eq!(
        built.message,
        "from Rollout ctr's served traffic: 450 training and 450 evaluation rows, 9 model features",
        "one row per served prediction; `late` waits for its click window"
    );
    let tuning = status.tuning.ok_or("no tuning status")?;
    assert_eq!(tuning.trials.len(), 3, "{tuning:?}");
    assert_eq!(
        tuning.trials[0].learning_rate, 0.002,
        "trial 0 is the job's settings"
    );
    let best = &tuning.trials[tuning.best_trial as usize];
    assert!(
        tuning
            .trials
            .iter()
            .all(|t| t.validation_log_loss >= best.validation_log_loss),
        "{tuning:?}"
    );
    let versions: Api<ModelVersion> = Api::namespaced(client.clone(), namespace);
    let version = versions.get("ctr-traffic").await?;
    assert_eq!(version.spec.lineage.served_traffic.as_deref(), Some("ctr"));
    assert_eq!(
        version.spec.lineage.data_range.map(|r| r.end.0),
        Some(split)
    );
    Ok(())
}

/// Rows of every Parquet part under `dir` (none while it does not exist).
fn logged_rows(dir: &std::path::Path) -> usize {
    flywheel_features::table::parquet_files(dir)
        .unwrap_or_default()
        .iter()
        .filter_map(|file| flywheel_features::table::read_batches(file).ok())
        .flatten()
        .map(|batch| batch.num_rows())
        .sum()
}

/// The IPs of the Rollout's serving pods once exactly three run, Ready, with the clicks topic.
/// The IP of the first running pod of the Rollout `ctr` with `role`.
async fn pod_ip(client: &Client, namespace: &str, role: &str) -> Result<Ipv4Addr, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let list = pods
        .list(&ListParams::default().labels(&format!(
            "flywheel.dev/rollout=ctr,flywheel.dev/role={role}"
        )))
        .await
        .map_err(|e| e.to_string())?;
    list.items
        .iter()
        .find_map(|pod| pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok())
        .ok_or_else(|| format!("no {role} pod with an IP"))
}

/// An unauthenticated caller repoints no route and swaps no model; a route table changed behind the
/// operator's back (here with the stolen admin token) is set back at the next reconcile, with an Event.
async fn nobody_without_the_token_changes_what_is_served(
    client: &Client,
    namespace: &str,
) -> TestResult {
    let router = SocketAddr::from((pod_ip(client, namespace, "router").await?, 8082));
    let server = SocketAddr::from((pod_ip(client, namespace, "serve").await?, 8082));
    let http = HttpClient::default();
    let hijack = json!({
        "backends": [{"name": "ctr-v1", "http": format!("http://{NODE_IP}:9"), "weight": 100}],
        "mirror": {"name": "exfiltrate", "http": format!("http://{NODE_IP}:9"), "percent": 100},
    })
    .to_string()
    .into_bytes();
    let (code, _) = http
        .send_to("PUT", router, "/admin/routes", Some(hijack.clone()), &[])
        .await?;
    assert_eq!(code, 401, "an anonymous route change");
    let swap = json!({"version": "evil", "uri": "/dev/zero"})
        .to_string()
        .into_bytes();
    let (code, _) = http
        .send_to("PUT", server, "/admin/model", Some(swap), &[])
        .await?;
    assert_eq!(code, 401, "an anonymous model swap");

    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), namespace);
    let token = secrets
        .get("ctr-credentials")
        .await?
        .data
        .unwrap_or_default()
        .get("admin-token")
        .map(|bytes| String::from_utf8_lossy(&bytes.0).into_owned())
        .ok_or("the Rollout's Secret has no admin token")?;
    let bearer = format!("Bearer {token}");
    let authorized = [("authorization", bearer.as_str())];
    let (code, _) = http
        .send_to("PUT", router, "/admin/routes", Some(hijack), &authorized)
        .await?;
    assert_eq!(code, 200);
    // Any change to the Rollout reconciles it; the operator finds the router's table drifted.
    api_for(client, "Rollout", namespace)?
        .patch(
            "ctr",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"example.com/touched": "1"}}})),
        )
        .await?;
    until("the route table to be set back", SETTLE, || {
        let http = http.clone();
        async move {
            let (_, table) = http
                .send_to("GET", router, "/admin/routes", None, &authorized)
                .await
                .map_err(|e| e.to_string())?;
            let restored = table["mirror"].is_null()
                && table["backends"][0]["http"]
                    .as_str()
                    .is_some_and(|url| url.starts_with("http://ctr-ctr-v1."));
            restored.then_some(()).ok_or(table.to_string())
        }
    })
    .await?;
    let events: Api<k8s_openapi::api::events::v1::Event> =
        Api::namespaced(client.clone(), namespace);
    until("a RoutesDrifted Event", SETTLE, || {
        let events = events.clone();
        async move {
            let list = events
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            list.items
                .iter()
                .any(|event| event.reason.as_deref() == Some("RoutesDrifted"))
                .then_some(())
                .ok_or("none yet".to_owned())
        }
    })
    .await?;
    Ok(())
}

async fn feedback_replicas(client: &Client, namespace: &str) -> Result<Vec<Ipv4Addr>, String> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let listed = pods
        .list(&ListParams::default().labels("flywheel.dev/rollout=ctr,flywheel.dev/role=serve"))
        .await
        .map_err(|e| e.to_string())?
        .items;
    let ready: Vec<Ipv4Addr> = listed
        .iter()
        .filter(|pod| pod.metadata.deletion_timestamp.is_none())
        .filter(|pod| {
            pod.spec.as_ref().is_some_and(|spec| {
                spec.containers[0]
                    .env
                    .iter()
                    .flatten()
                    .any(|v| v.name == "FLYWHEEL_CLICKS_TOPIC")
            })
        })
        .filter(|pod| {
            pod.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .filter_map(|pod| pod.status.as_ref()?.pod_ip.as_ref()?.parse().ok())
        .collect();
    if ready.len() == 3 && listed.len() == 3 {
        Ok(ready)
    } else {
        Err(format!("{} ready of {} pods", ready.len(), listed.len()))
    }
}

/// A serving pod's labels read from Kafka: (matched to its predictions, unmatched).
async fn kafka_feedback(ip: Ipv4Addr) -> Result<(f64, f64), String> {
    let (_, text) = http_get_at(SocketAddr::from((ip, 8082)), "/metrics")
        .await
        .map_err(|e| e.to_string())?;
    let count = |outcome: &str| {
        metric(
            &text,
            "flywheel_serving_feedback_total",
            &["source=\"kafka\"", &format!("outcome=\"{outcome}\"")],
        )
        .unwrap_or(0.0)
    };
    Ok((count("matched"), count("unmatched")))
}
