//! The training-set step of a TrainingJob on a FeatureView or on a Rollout's served traffic: before the gang is
//! admitted (no GPU is held while data is built), a batch Job of the trainer image builds the train and eval
//! sets and the model's feature schema beside the job's model. From a view (`flywheel-trainer training-set`)
//! it joins the view's features, as of each labeled event, onto the events of each range; from served traffic
//! (`flywheel-trainer traffic-training-set`) it labels each logged prediction by its clicks and keeps the
//! features as they were scored. Its outcome becomes the `DatasetBuilt` condition.

use flywheel_crds::FeatureView;
use flywheel_crds::common::TimeRange;
use flywheel_crds::trainingjob::TrainingJob;
use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::gang::{self, Paths, TrainerSettings};
use crate::batch_job::Outcome;
use crate::featureview::builders::view_json;
use crate::objects::{owner, security};

pub const CONDITION_DATASET_BUILT: &str = "DatasetBuilt";
/// Label of the training-set Job and its pod: the TrainingJob it builds for.
pub const LABEL_DATASET_OF: &str = "flywheel.dev/dataset-of";

/// What the controller found for the step of a job whose training set is not built yet.
#[derive(Clone, Debug, PartialEq)]
pub enum DatasetObservation {
    /// The job reads ready-made sets, or its status already says they are built: nothing was looked up.
    NotNeeded,
    /// What the step reads is not there (yet): a reason and a message naming it.
    Missing { reason: String, message: String },
    /// What the step reads, and the step's Job if it exists.
    Found {
        input: DatasetInput,
        job: Option<Outcome>,
    },
}

/// What a training set is built from.
#[derive(Clone, Debug, PartialEq)]
pub enum DatasetInput {
    View(Box<FeatureView>),
    Traffic(ServedTraffic),
}

/// A Rollout's traffic log and the model it served, which gives the new model its feature schema.
#[derive(Clone, Debug, PartialEq)]
pub struct ServedTraffic {
    /// `spec.feedback.trafficLog.uri` of the Rollout.
    pub log: String,
    /// The stable version's artifact and its digest.
    pub model_uri: String,
    pub model_sha256: String,
}

/// What the plan does about the step.
#[derive(Debug, PartialEq)]
pub enum DatasetStep {
    /// Built (now or before): go on to admission.
    Built {
        summary: Option<String>,
    },
    /// Create the Job and wait.
    Start(Box<Job>),
    /// The Job runs; wait.
    Building,
    Waiting {
        reason: String,
        message: String,
    },
    Failed(String),
}

/// Where the job's sets come from, in words (`FeatureView ctr-events`, `Rollout ctr's served traffic`).
pub fn source(job: &TrainingJob) -> String {
    match (&job.spec.data.feature_view, &job.spec.data.served_traffic) {
        (Some(view), _) => format!("FeatureView {}", view.name),
        (None, Some(traffic)) => format!("Rollout {}'s served traffic", traffic.rollout),
        (None, None) => "the dataset".to_owned(),
    }
}

/// The name of a job's training-set Job.
pub fn job_name(training_job: &str) -> String {
    format!("{training_job}-dataset")
}

/// Decides the step from what was observed.
pub fn step(
    job: &TrainingJob,
    paths: &Paths,
    settings: &TrainerSettings,
    observed: &DatasetObservation,
) -> Result<DatasetStep, serde_json::Error> {
    Ok(match observed {
        DatasetObservation::NotNeeded => DatasetStep::Built { summary: None },
        DatasetObservation::Missing { reason, message } => DatasetStep::Waiting {
            reason: reason.clone(),
            message: message.clone(),
        },
        DatasetObservation::Found { input, job: None } => match ranges(job) {
            Some(ranges) => {
                DatasetStep::Start(Box::new(builder(job, input, ranges, paths, settings)?))
            }
            None => DatasetStep::Failed(format!(
                "spec.data.{}: the train and eval ranges do not resolve",
                if job.spec.data.feature_view.is_some() {
                    "featureView"
                } else {
                    "servedTraffic"
                }
            )),
        },
        DatasetObservation::Found {
            job: Some(Outcome::Running),
            ..
        } => DatasetStep::Building,
        DatasetObservation::Found {
            job: Some(Outcome::Succeeded { message, .. }),
            ..
        } => DatasetStep::Built {
            summary: Some(summary(message.as_deref())),
        },
        DatasetObservation::Found {
            job: Some(Outcome::Failed { message }),
            ..
        } => DatasetStep::Failed(format!(
            "Job {} failed: {}",
            job_name(&job.name_any()),
            failure(message.as_deref())
        )),
    })
}

/// The job's absolute (train, eval) ranges: relative ones count back from its creation.
pub fn ranges(job: &TrainingJob) -> Option<(TimeRange, TimeRange)> {
    let created = job
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(jiff::Timestamp::UNIX_EPOCH, |t| t.0);
    match (&job.spec.data.feature_view, &job.spec.data.served_traffic) {
        (Some(view), _) => view.ranges(created),
        (None, Some(traffic)) => traffic.ranges(created),
        (None, None) => None,
    }
}

/// The report `training-set` leaves in its termination message.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Report {
    train_rows: Option<u64>,
    eval_rows: Option<u64>,
    features: Option<u64>,
    error: Option<String>,
}

fn report(message: Option<&str>) -> Option<Report> {
    serde_json::from_str(message?.trim()).ok()
}

fn summary(message: Option<&str>) -> String {
    match report(message) {
        Some(Report {
            train_rows: Some(train),
            eval_rows: Some(eval),
            features,
            ..
        }) => format!(
            "{train} training and {eval} evaluation rows, {} model features",
            features.map_or("?".to_owned(), |f| f.to_string())
        ),
        _ => "built (the Job left no report)".to_owned(),
    }
}

fn failure(message: Option<&str>) -> String {
    match (report(message), message) {
        (Some(Report { error: Some(e), .. }), _) => e,
        (_, Some(text)) if !text.trim().is_empty() => text.trim().to_owned(),
        _ => "no termination message".to_owned(),
    }
}

/// The container's arguments and environment for `input`.
fn command(
    job: &TrainingJob,
    input: &DatasetInput,
    (train, eval): (TimeRange, TimeRange),
    out_dir: String,
) -> (Vec<String>, Vec<Value>) {
    let range = |r: &TimeRange| format!("{},{}", r.start.0, r.end.0);
    let mut env = vec![
        json!({"name": "FLYWHEEL_TERMINATION_LOG", "value": "/dev/termination-log"}),
        json!({"name": "TMPDIR", "value": gang::SCRATCH}),
    ];
    let args = match (
        input,
        &job.spec.data.feature_view,
        &job.spec.data.served_traffic,
    ) {
        (DatasetInput::View(view), Some(data), _) => {
            env.push(json!({"name": "FLYWHEEL_FEATURE_VIEW", "value": view_json(view)}));
            let local = |uri: &str| uri.strip_prefix("file://").unwrap_or(uri).to_owned();
            let mut args = vec![
                "training-set".to_owned(),
                "--events".to_owned(),
                local(&data.events),
                "--label".to_owned(),
                data.label.clone(),
                "--event-time".to_owned(),
                data.timestamp_field.clone(),
            ];
            if let Some(join) = &data.sample_join {
                args.extend([
                    "--clicks".to_owned(),
                    local(&join.clicks),
                    "--click-window".to_owned(),
                    join.click_window().to_owned(),
                    "--request-id".to_owned(),
                    join.request_id_column().to_owned(),
                    "--click-id".to_owned(),
                    join.click_id_column().to_owned(),
                ]);
                if let Some(conversions) = &join.conversions {
                    args.extend([
                        "--conversions".to_owned(),
                        local(conversions),
                        "--conversion-window".to_owned(),
                        join.conversion_window().to_owned(),
                    ]);
                }
            }
            args
        }
        (DatasetInput::Traffic(traffic), _, Some(data)) => vec![
            "traffic-training-set".to_owned(),
            "--traffic".to_owned(),
            traffic.log.clone(),
            "--model".to_owned(),
            traffic.model_uri.clone(),
            "--model-sha256".to_owned(),
            traffic.model_sha256.clone(),
            "--click-window".to_owned(),
            data.click_window().to_owned(),
        ],
        // The observation follows the spec; a spec changed in between is read at the next reconcile.
        _ => Vec::new(),
    };
    let mut args = args;
    args.extend([
        "--train-range".to_owned(),
        range(&train),
        "--eval-range".to_owned(),
        range(&eval),
        "--out-dir".to_owned(),
        out_dir,
    ]);
    (args, env)
}

/// The Job that builds the sets: the trainer image with the training storage, the restricted security
/// context.
fn builder(
    job: &TrainingJob,
    input: &DatasetInput,
    ranges: (TimeRange, TimeRange),
    paths: &Paths,
    settings: &TrainerSettings,
) -> Result<Job, serde_json::Error> {
    let name = job.name_any();
    let (args, env) = command(job, input, ranges, gang::dataset_dir(&paths.output));
    let (volumes, mounts) = gang::volumes(settings);
    let labels = json!({
        LABEL_DATASET_OF: name,
        "app.kubernetes.io/managed-by": "flywheel-operator",
        "app.kubernetes.io/component": "training-set",
    });
    serde_json::from_value(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(&name),
            "namespace": job.namespace(),
            "labels": labels,
            "ownerReferences": [owner(job)],
        },
        "spec": {
            // Data errors repeat; one retry covers a node that went away.
            "backoffLimit": 1,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": settings.service_account,
                    "automountServiceAccountToken": false,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                                        "fsGroup": 65532},
                    "volumes": volumes,
                    "containers": [{
                        "name": "training-set",
                        "image": job.spec.image.clone().unwrap_or_else(|| settings.image.clone()),
                        "args": args,
                        "env": env,
                        "volumeMounts": mounts,
                        "terminationMessagePolicy": "FallbackToLogsOnError",
                        "securityContext": security(),
                    }],
                },
            },
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::examples::load;

    fn job() -> TrainingJob {
        let mut job: TrainingJob = load("trainingjob-ps.yaml", 1);
        job.metadata.namespace = Some("team".into());
        job.metadata.uid = Some("uid-1".into());
        job
    }

    fn decide(observed: &DatasetObservation) -> DatasetStep {
        decide_for(&job(), observed)
    }

    fn decide_for(job: &TrainingJob, observed: &DatasetObservation) -> DatasetStep {
        let paths = gang::paths(&job.name_any(), &job.spec).unwrap_or_else(|e| panic!("{e}"));
        let settings = TrainerSettings {
            storage_claim: Some("flywheel-data".into()),
            ..TrainerSettings::default()
        };
        step(job, &paths, &settings, observed).unwrap_or_else(|e| panic!("{e}"))
    }

    fn view() -> DatasetInput {
        let mut view: FeatureView = load("featureview.yaml", 1);
        view.metadata.namespace = Some("team".into());
        DatasetInput::View(Box::new(view))
    }

    #[test]
    fn a_missing_job_is_started_with_the_ranges_the_view_and_the_storage() {
        let DatasetStep::Start(built) = decide(&DatasetObservation::Found {
            input: view(),
            job: None,
        }) else {
            panic!("expected a Job to start");
        };
        assert_eq!(built.name_any(), "ctr-deepfm-ps-dataset");
        assert_eq!(built.labels()[LABEL_DATASET_OF], "ctr-deepfm-ps");
        let spec = built.spec.and_then(|s| s.template.spec).unwrap_or_default();
        let container = &spec.containers[0];
        let args = container.args.clone().unwrap_or_default().join(" ");
        assert!(
            args.starts_with(
                "training-set --events /var/lib/flywheel/events/impressions/ --label clicked \
                 --event-time event_timestamp \
                 --train-range 2026-11-01T00:00:00Z,2026-11-15T00:00:00Z \
                 --eval-range 2026-11-15T00:00:00Z,2026-11-16T00:00:00Z \
                 --out-dir /var/lib/flywheel/models/ctr-deepfm-ps/dataset"
            ),
            "{args}"
        );
        let env = container.env.clone().unwrap_or_default();
        assert!(env.iter().any(|v| {
            v.name == "FLYWHEEL_FEATURE_VIEW"
                && v.value
                    .as_deref()
                    .is_some_and(|j| j.contains("\"ctr-events\""))
        }));
        assert!(spec.volumes.unwrap_or_default().iter().any(|v| {
            v.persistent_volume_claim
                .as_ref()
                .map(|c| c.claim_name.as_str())
                == Some("flywheel-data")
        }));
        assert_eq!(
            container
                .security_context
                .as_ref()
                .and_then(|s| s.read_only_root_filesystem),
            Some(true)
        );
    }

    #[test]
    fn the_outcome_of_the_job_is_the_step() {
        let view = view();
        assert_eq!(
            decide(&DatasetObservation::Found {
                input: view.clone(),
                job: Some(Outcome::Running),
            }),
            DatasetStep::Building
        );
        assert_eq!(
            decide(&DatasetObservation::Found {
                input: view.clone(),
                job: Some(Outcome::Succeeded {
                    finished: jiff::Timestamp::UNIX_EPOCH,
                    message: Some(
                        r#"{"event":"trainingSet","trainRows":900,"evalRows":100,"features":5}"#
                            .into()
                    ),
                }),
            }),
            DatasetStep::Built {
                summary: Some("900 training and 100 evaluation rows, 5 model features".into())
            }
        );
        assert_eq!(
            decide(&DatasetObservation::Found {
                input: view,
                job: Some(Outcome::Failed {
                    message: Some(
                        r#"{"event":"failed","error":"/e: no label column `clicked` (spec.data.featureView.label); it has user_id"}"#
                            .into()
                    ),
                }),
            }),
            DatasetStep::Failed(
                "Job ctr-deepfm-ps-dataset failed: /e: no label column `clicked` \
                 (spec.data.featureView.label); it has user_id"
                    .into()
            )
        );
        let missing = DatasetObservation::Missing {
            reason: "FeatureViewMissing".into(),
            message: "waiting for FeatureView `ctr-events`".into(),
        };
        assert_eq!(
            decide(&missing),
            DatasetStep::Waiting {
                reason: "FeatureViewMissing".into(),
                message: "waiting for FeatureView `ctr-events`".into(),
            }
        );
    }

    #[test]
    fn impressions_are_labeled_by_sample_joining_their_clicks_and_conversions() {
        let mut job = job();
        if let Some(view) = &mut job.spec.data.feature_view {
            view.label = "label_convert".into();
            view.sample_join = Some(flywheel_crds::trainingjob::SampleJoinData {
                clicks: "file:///var/lib/flywheel/events/clicks/".into(),
                conversions: Some("file:///var/lib/flywheel/events/conversions/".into()),
                click_window: None,
                conversion_window: Some(flywheel_crds::common::Duration::from("1d")),
                request_id_column: Some("impression_id".into()),
                click_id_column: None,
            });
        }
        let DatasetStep::Start(built) = decide_for(
            &job,
            &DatasetObservation::Found {
                input: view(),
                job: None,
            },
        ) else {
            panic!("expected a Job to start");
        };
        let spec = built.spec.and_then(|s| s.template.spec).unwrap_or_default();
        let args = spec.containers[0]
            .args
            .clone()
            .unwrap_or_default()
            .join(" ");
        assert!(
            args.contains(
                "--label label_convert --event-time event_timestamp \
                 --clicks /var/lib/flywheel/events/clicks/ --click-window 30m \
                 --request-id impression_id --click-id click_id \
                 --conversions /var/lib/flywheel/events/conversions/ --conversion-window 1d \
                 --train-range"
            ),
            "{args}"
        );
    }

    #[test]
    fn served_traffic_is_built_from_the_log_with_the_served_models_schema() {
        let mut job = job();
        let view = job.spec.data.feature_view.take();
        let Some(view) = view else {
            panic!("the example reads a FeatureView");
        };
        job.spec.data.served_traffic = Some(flywheel_crds::trainingjob::ServedTrafficData {
            rollout: "ctr".into(),
            click_window: Some(flywheel_crds::common::Duration::from("10m")),
            train_range: view.train_range,
            eval_range: view.eval_range,
        });
        let input = DatasetInput::Traffic(ServedTraffic {
            log: "file:///var/lib/flywheel/traffic/ctr".into(),
            model_uri: "file:///var/lib/flywheel/models/ctr-v1/model.fwm".into(),
            model_sha256: "ab".repeat(32),
        });
        let DatasetStep::Start(built) =
            decide_for(&job, &DatasetObservation::Found { input, job: None })
        else {
            panic!("expected a Job to start");
        };
        let spec = built.spec.and_then(|s| s.template.spec).unwrap_or_default();
        let args = spec.containers[0]
            .args
            .clone()
            .unwrap_or_default()
            .join(" ");
        assert_eq!(
            args,
            format!(
                "traffic-training-set --traffic file:///var/lib/flywheel/traffic/ctr \
                 --model file:///var/lib/flywheel/models/ctr-v1/model.fwm --model-sha256 {} \
                 --click-window 10m \
                 --train-range 2026-11-01T00:00:00Z,2026-11-15T00:00:00Z \
                 --eval-range 2026-11-15T00:00:00Z,2026-11-16T00:00:00Z \
                 --out-dir /var/lib/flywheel/models/ctr-deepfm-ps/dataset",
                "ab".repeat(32)
            )
        );
        assert_eq!(source(&job), "Rollout ctr's served traffic");
    }
}
