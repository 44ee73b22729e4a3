//! A TrainingJob on a FeatureView, on the real node, as a user applies them: the operator (the chart's)
//! materializes the view, builds the job's point-in-time train and eval sets (ranges relative to the job's
//! creation) in a Job of the trainer image before the gang is admitted, trains on them, and registers a
//! ModelVersion whose lineage names the view, its schema hash and the exact training range. Events without the label column fail the job with the reason.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use flywheel_crds::trainingjob::TrainingPhase;
use flywheel_crds::{FeatureView, ModelVersion, TrainingJob};
use flywheel_e2e::on_node::{self, STORAGE, namespace_with_storage};
use flywheel_e2e::training_jobs::{finished, job_until};
use flywheel_e2e::wait::until;
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
        view.status.and_then(|s| s.schema_hash),
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
    Ok(())
}
