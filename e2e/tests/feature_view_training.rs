//! A TrainingJob on a FeatureView, on the real node, as a user applies them: the operator (the chart's)
//! materializes the view, builds the job's point-in-time train and eval sets (ranges relative to the job's
//! creation) in a Job of the trainer image before the gang is admitted, trains on them, and registers a
//! ModelVersion whose lineage names the view, its schema hash and the exact training range. Events without the
//! label column fail the job with the reason. A Rollout serving the model with the view's online features
//! scores a request carrying only the user's key exactly as the trainer scores that user's point-in-time row.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use arrow_array::{ArrayRef, Int64Array, TimestampMicrosecondArray};
use flywheel_crds::trainingjob::TrainingPhase;
use flywheel_crds::{FeatureView, ModelVersion, TrainingJob};
use flywheel_e2e::fixtures::api_for;
use flywheel_e2e::on_node::{self, NODE_IP, STORAGE, namespace_with_storage};
use flywheel_e2e::serving::{HttpClient, Redis};
use flywheel_e2e::training_jobs::{finished, job_until};
use flywheel_e2e::wait::until;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::PostParams;
use serde_json::{Value, json};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const TRAINING: Duration = Duration::from_secs(300);

/// Feature events (`source/events.parquet`) and labeled events (`labels/labels.parquet`) of the day before
/// `end`, on the namespace's volume.
fn generate(storage: &Path, end: &str) -> Result<(), Box<dyn std::error::Error>> {
    let source = storage.join("source");
    let output = Command::new(flywheel_e2e::bin_dir().join("flywheel-trainer"))
        .args(["generate-events", "--users", "300", "--events", "20000"])
        .args(["--labels", "6000", "--span", "1d", "--end", end, "--out"])
        .arg(&source)
        .output()?;
    if !output.status.success() {
        return Err(String::from_utf8_lossy(&output.stderr).into_owned().into());
    }
    std::fs::create_dir_all(storage.join("labels"))?;
    std::fs::rename(
        source.join("labels.parquet"),
        storage.join("labels/labels.parquet"),
    )?;
    Ok(())
}

fn training_job(name: &str, label: &str, train: Value, eval: Value) -> Value {
    json!({
        "apiVersion": "flywheel.dev/v1alpha1", "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "data": {"featureView": {
                "name": "users",
                "events": format!("file://{STORAGE}/labels/labels.parquet"),
                "label": label,
                "trainRange": train,
                "evalRange": eval,
            }},
            "model": {"name": "ctr", "architecture": "deepfm", "embeddingDim": 8, "hiddenLayers": [16]},
            "epochs": 1, "batchSize": 256, "seed": 3,
            "topology": {"single": {}},
            "output": {"artifactUri": format!("file://{STORAGE}/models")},
        },
    })
}

#[tokio::test]
async fn a_training_job_on_a_feature_view_trains_on_its_point_in_time_sets() -> TestResult {
    let cluster = on_node::operator(&[]).await?;
    let client = cluster.client().await?;
    let (namespace, storage) = namespace_with_storage(cluster, &client, "fv-train").await?;
    // Whole seconds: the API's times have no fractions.
    let now = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second())?;
    let end = now.checked_sub(jiff::SignedDuration::from_hours(1))?;
    generate(&storage, &end.to_string())?;
    // The online store stands outside the cluster, as a managed Redis would; pods reach it on the node's address.
    let staging = cluster.state_dir().join(format!("{namespace}-staging"));
    std::fs::create_dir_all(&staging)?;
    let bind = format!("127.0.0.1 {NODE_IP}");
    let redis = Redis::start_with(&staging, &["--bind", &bind, "--protected-mode", "no"]).await?;

    let views: Api<FeatureView> = Api::namespaced(client.clone(), &namespace);
    views
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "flywheel.dev/v1alpha1", "kind": "FeatureView",
                "metadata": {"name": "users"},
                "spec": {
                    "entities": [{"name": "user", "joinKey": "user_id", "valueType": "Int64"}],
                    "source": {"batch": {"uri": format!("file://{STORAGE}/source"),
                                         "timestampField": "event_timestamp"}},
                    "features": [
                        {"name": "price", "valueType": "Float64"},
                        {"name": "category", "valueType": "String"},
                        {"name": "events_1d", "column": "price", "valueType": "Int64",
                         "aggregation": {"function": "count", "window": "1d"}},
                    ],
                    "ttl": "2d",
                    "offline": {"uri": format!("file://{STORAGE}/offline")},
                    "online": {"redis": {"address": format!("{NODE_IP}:{}", redis.port)}},
                    "materialization": {"schedule": "@every 1h"},
                },
            }))?,
        )
        .await?;
    let view = until("the view to be materialized", TRAINING, || {
        let views = views.clone();
        async move {
            let view = views.get("users").await.map_err(|e| e.to_string())?;
            let rows = view
                .status
                .as_ref()
                .and_then(|s| s.last_materialization.as_ref())
                .map_or(0, |run| run.rows);
            if rows > 0 {
                Ok(view)
            } else {
                Err(format!("{:?}", view.status))
            }
        }
    })
    .await?;

    // Relative ranges: the last seven hours before the job evaluate (the six before the data ends, and the
    // hour since), the seventeen before them train.
    let jobs: Api<TrainingJob> = Api::namespaced(client.clone(), &namespace);
    let created = jobs
        .create(
            &PostParams::default(),
            &serde_json::from_value(training_job(
                "from-view",
                "label",
                json!({"last": "17h"}),
                json!({"last": "7h"}),
            ))?,
        )
        .await?;
    let created = created
        .metadata
        .creation_timestamp
        .ok_or("no creation time")?
        .0;
    let split = created.checked_sub(jiff::SignedDuration::from_hours(7))?;
    let start = split.checked_sub(jiff::SignedDuration::from_hours(17))?;
    let (start, split, stop) = (start.to_string(), split.to_string(), created.to_string());
    let done = job_until(
        &client,
        &namespace,
        "from-view",
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
    assert_eq!(built.status, "True", "{built:?}");
    assert!(
        built.message.starts_with("from FeatureView users: ")
            && built.message.contains(" training and "),
        "{built:?}"
    );
    for file in ["train.parquet", "eval.parquet", "schema.json"] {
        assert!(
            storage
                .join("models/from-view/dataset")
                .join(file)
                .is_file(),
            "{file} beside the model"
        );
    }
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(
        storage.join("models/from-view/dataset/schema.json"),
    )?)?;
    let names: Vec<&str> = schema["features"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(names, ["user_id", "price", "category", "events_1d"]);

    let version = Api::<ModelVersion>::namespaced(client.clone(), &namespace)
        .get("from-view")
        .await?;
    let lineage = &version.spec.lineage;
    assert_eq!(lineage.feature_view.as_deref(), Some("users"));
    assert_eq!(
        lineage.feature_view_schema_hash,
        view.status.clone().and_then(|s| s.schema_hash),
        "the schema the sets were built with"
    );
    let range = lineage.data_range.as_ref().ok_or("no dataRange")?;
    assert_eq!(
        (range.start.0.to_string(), range.end.0.to_string()),
        (start.clone(), split.clone())
    );

    // Events without the label the job names: the build fails and says which column is missing.
    jobs.create(
        &PostParams::default(),
        &serde_json::from_value(training_job(
            "wrong-label",
            "clicked",
            json!({"start": start, "end": split}),
            json!({"start": split, "end": stop}),
        ))?,
    )
    .await?;
    let failed = job_until(
        &client,
        &namespace,
        "wrong-label",
        "to fail",
        TRAINING,
        finished,
    )
    .await?;
    let status = failed.status.unwrap_or_default();
    assert_eq!(status.phase, Some(TrainingPhase::Failed), "{status:?}");
    let reason = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Failed")
        .ok_or("no Failed condition")?;
    assert_eq!(reason.reason, "DatasetBuildFailed", "{reason:?}");
    assert!(
        reason.message.contains("no label column `clicked`"),
        "{reason:?}"
    );

    // Served with the view's online features: a request carrying only the user's key scores the same as the
    // offline point-in-time row of that user now, scored by the trainer.
    let rollouts = api_for(&client, "Rollout", &namespace)?;
    rollouts
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "flywheel.dev/v1alpha1", "kind": "Rollout",
                "metadata": {"name": "ctr"},
                "spec": {
                    "modelVersion": "from-view",
                    "serving": {"replicas": 1},
                    "traffic": {"router": {"replicas": 1}},
                    "onlineFeatures": {"featureView": "users"},
                },
            }))?,
        )
        .await?;
    let user = 7;
    let offline = offline_score(&view, &storage, &staging, user, now)?;
    let services: Api<Service> = Api::namespaced(client.clone(), &namespace);
    let cluster_ip: Ipv4Addr = until("the Rollout's Service", TRAINING, || {
        let services = services.clone();
        async move {
            services
                .get("ctr")
                .await
                .map_err(|e| e.to_string())?
                .spec
                .and_then(|spec| spec.cluster_ip)
                .ok_or("no ClusterIP yet".to_owned())?
                .parse()
                .map_err(|e| format!("{e}"))
        }
    })
    .await?;
    let body = json!({
        "id": "only-the-key",
        "inputs": [{"name": "user_id", "shape": [1], "datatype": "INT64", "data": [user]}],
    })
    .to_string()
    .into_bytes();
    let http = HttpClient::default();
    let answer = until("a prediction from the key alone", TRAINING, || {
        let http = http.clone();
        let body = body.clone();
        async move {
            match http
                .send_to(
                    "POST",
                    SocketAddr::from((cluster_ip, 8080)),
                    "/v2/models/ctr/infer",
                    Some(body),
                    &[],
                )
                .await
            {
                Ok((200, answer)) => Ok(answer),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await?;
    let online = answer["outputs"][0]["data"][0]
        .as_f64()
        .ok_or_else(|| format!("no score in {answer}"))?;
    assert!(
        (online - offline).abs() < 1e-5,
        "online {online} from Redis, offline {offline} from the point-in-time row"
    );
    Ok(())
}

/// The trainer's score for `user`'s point-in-time row at `at`: the offline table joined as of then (its latest
/// features, which are what the online store holds), scored by `flywheel-trainer score` with the served model.
fn offline_score(
    view: &FeatureView,
    storage: &Path,
    staging: &Path,
    user: i64,
    at: jiff::Timestamp,
) -> Result<f64, Box<dyn std::error::Error>> {
    let events = staging.join("one-event.parquet");
    flywheel_features::table::write_parquet(
        &events,
        vec![
            (
                "user_id".into(),
                Arc::new(Int64Array::from(vec![user])) as ArrayRef,
            ),
            (
                "event_timestamp".into(),
                Arc::new(
                    TimestampMicrosecondArray::from(vec![at.as_microsecond()]).with_timezone("UTC"),
                ),
            ),
            ("label".into(), Arc::new(Int64Array::from(vec![1]))),
        ],
    )?;
    let manifest = staging.join("users.json");
    std::fs::write(&manifest, serde_json::to_string(view)?)?;
    let set = staging.join("one-row.parquet");
    let scores = staging.join("scores.json");
    let trainer = flywheel_e2e::bin_dir().join("flywheel-trainer");
    for args in [
        vec![
            "build-dataset".into(),
            "--view".into(),
            manifest.display().to_string(),
            "--features".into(),
            storage.join("offline").display().to_string(),
            "--events".into(),
            events.display().to_string(),
            "--out".into(),
            set.display().to_string(),
        ],
        vec![
            "score".into(),
            "--model".into(),
            storage
                .join("models/from-view/model.fwm")
                .display()
                .to_string(),
            "--data".into(),
            set.display().to_string(),
            "--label".into(),
            "label".into(),
            "--out".into(),
            scores.display().to_string(),
        ],
    ] {
        let output = Command::new(&trainer).args(&args).output()?;
        if !output.status.success() {
            return Err(format!(
                "flywheel-trainer {}: {}",
                args[0],
                String::from_utf8_lossy(&output.stderr)
            )
            .into());
        }
    }
    let scores: Vec<f64> = serde_json::from_str(&std::fs::read_to_string(scores)?)?;
    scores.first().copied().ok_or_else(|| "no score".into())
}
