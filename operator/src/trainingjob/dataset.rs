//! The training-set step of a TrainingJob on a FeatureView: before the gang is admitted (no GPU is held while
//! data is built), a batch Job of the trainer image (`flywheel-trainer training-set`) joins the view's
//! features, as of each labeled event, onto the events of the train and eval ranges and writes the sets and the
//! model's feature schema beside the job's model. Its outcome becomes the `DatasetBuilt` condition.

use flywheel_crds::FeatureView;
use flywheel_crds::common::TimeRange;
use flywheel_crds::trainingjob::{FeatureViewData, TrainingJob};
use k8s_openapi::api::batch::v1::Job;
use kube::ResourceExt;
use serde::Deserialize;
use serde_json::json;

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
    /// The FeatureView the job names does not exist (yet).
    ViewMissing,
    /// The view, and the step's Job if it exists.
    View {
        view: Box<FeatureView>,
        job: Option<Outcome>,
    },
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
    WaitingForView,
    Failed(String),
}

/// The name of a job's training-set Job.
pub fn job_name(training_job: &str) -> String {
    format!("{training_job}-dataset")
}

/// Decides the step from what was observed.
pub fn step(
    job: &TrainingJob,
    data: &FeatureViewData,
    paths: &Paths,
    settings: &TrainerSettings,
    observed: &DatasetObservation,
) -> Result<DatasetStep, serde_json::Error> {
    Ok(match observed {
        DatasetObservation::NotNeeded => DatasetStep::Built { summary: None },
        DatasetObservation::ViewMissing => DatasetStep::WaitingForView,
        DatasetObservation::View { view, job: None } => match ranges(job, data) {
            Some(ranges) => {
                DatasetStep::Start(Box::new(builder(job, view, data, ranges, paths, settings)?))
            }
            None => DatasetStep::Failed(
                "spec.data.featureView: the train and eval ranges do not resolve".to_owned(),
            ),
        },
        DatasetObservation::View {
            job: Some(Outcome::Running),
            ..
        } => DatasetStep::Building,
        DatasetObservation::View {
            job: Some(Outcome::Succeeded { message, .. }),
            ..
        } => DatasetStep::Built {
            summary: Some(summary(message.as_deref())),
        },
        DatasetObservation::View {
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
pub fn ranges(job: &TrainingJob, data: &FeatureViewData) -> Option<(TimeRange, TimeRange)> {
    let created = job
        .metadata
        .creation_timestamp
        .as_ref()
        .map_or(jiff::Timestamp::UNIX_EPOCH, |t| t.0);
    data.ranges(created)
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

/// The Job that builds the sets: the trainer image with the training storage, the view as JSON in its
/// environment, the restricted security context.
fn builder(
    job: &TrainingJob,
    view: &FeatureView,
    data: &FeatureViewData,
    (train, eval): (TimeRange, TimeRange),
    paths: &Paths,
    settings: &TrainerSettings,
) -> Result<Job, serde_json::Error> {
    let name = job.name_any();
    let events = data.events.strip_prefix("file://").unwrap_or(&data.events);
    let range = |r: &TimeRange| format!("{},{}", r.start.0, r.end.0);
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
                        "args": [
                            "training-set",
                            "--events", events,
                            "--label", data.label,
                            "--event-time", data.timestamp_field,
                            "--train-range", range(&train),
                            "--eval-range", range(&eval),
                            "--out-dir", gang::dataset_dir(&paths.output),
                        ],
                        "env": [
                            {"name": "FLYWHEEL_FEATURE_VIEW", "value": view_json(view)},
                            {"name": "FLYWHEEL_TERMINATION_LOG", "value": "/dev/termination-log"},
                            {"name": "TMPDIR", "value": gang::SCRATCH},
                        ],
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
        let job = job();
        let paths = gang::paths(&job.name_any(), &job.spec).unwrap_or_else(|e| panic!("{e}"));
        let data = job
            .spec
            .data
            .feature_view
            .clone()
            .unwrap_or_else(|| panic!("the example reads a FeatureView"));
        let settings = TrainerSettings {
            storage_claim: Some("flywheel-data".into()),
            ..TrainerSettings::default()
        };
        step(&job, &data, &paths, &settings, observed).unwrap_or_else(|e| panic!("{e}"))
    }

    fn view() -> Box<FeatureView> {
        let mut view: FeatureView = load("featureview.yaml", 1);
        view.metadata.namespace = Some("team".into());
        Box::new(view)
    }

    #[test]
    fn a_missing_job_is_started_with_the_ranges_the_view_and_the_storage() {
        let DatasetStep::Start(built) = decide(&DatasetObservation::View {
            view: view(),
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
            decide(&DatasetObservation::View {
                view: view.clone(),
                job: Some(Outcome::Running),
            }),
            DatasetStep::Building
        );
        assert_eq!(
            decide(&DatasetObservation::View {
                view: view.clone(),
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
            decide(&DatasetObservation::View {
                view,
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
        assert_eq!(
            decide(&DatasetObservation::ViewMissing),
            DatasetStep::WaitingForView
        );
    }
}
