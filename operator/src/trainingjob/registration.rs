//! A finished gang's result: the ModelVersion it registers (artifact, metrics, lineage, gates), the offline
//! metrics, convergence and tuning in the job's status, and the parameter servers removed.

use std::collections::BTreeMap;

use flywheel_crds::ModelVersion;
use flywheel_crds::common::ConditionStatus;
use flywheel_crds::modelversion::{
    Artifact, ArtifactFormat, Lineage, ModelVersionSpec, OfflineMetrics,
};
use flywheel_crds::trainingjob::{ConvergenceStatus, TrainingPhase, TrainingProgress};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

use super::builder::{Builder, CONDITION_COMPLETE};
use super::chief::ChiefResult;
use super::dataset;
use super::gang::{self, Role};
use super::pods::member_of;

/// Annotation on a produced ModelVersion naming the TrainingJob's UID (a registry entry outlives the job,
/// so it carries no ownerReference).
pub const ANNOTATION_JOB_UID: &str = "flywheel.dev/training-job-uid";
pub const LABEL_MODEL: &str = "flywheel.dev/model";

pub(super) fn succeed(
    b: &mut Builder<'_, '_>,
    result: &ChiefResult,
    warm_start: Option<(&str, &str)>,
) {
    let job = b.observed.job;
    let metrics = OfflineMetrics {
        auc: result.metrics.auc,
        gauc: result.metrics.gauc,
        log_loss: result.metrics.log_loss,
        calibration: result.metrics.calibration,
        uncalibrated_calibration: result.metrics.uncalibrated_calibration,
        eval_samples: Some(result.metrics.samples),
    };
    let name = job.name_any();
    let uri = if result.artifact.contains("://") {
        result.artifact.clone()
    } else {
        format!("file://{}", result.artifact)
    };
    let mut version = ModelVersion::new(
        &name,
        ModelVersionSpec {
            model_name: job.spec.model.name.clone(),
            artifact: Artifact {
                uri,
                sha256: result.sha256.clone(),
                format: ArtifactFormat::FlywheelV1,
            },
            feature_schema_hash: result.feature_schema_hash.clone(),
            lineage: Lineage {
                training_job: Some(name.clone()),
                feature_view: job
                    .spec
                    .data
                    .feature_view
                    .as_ref()
                    .map(|v| v.name.clone())
                    .or_else(|| result.feature_view.as_ref().map(|v| v.name.clone())),
                feature_view_schema_hash: result
                    .feature_view
                    .as_ref()
                    .map(|v| v.schema_hash.clone()),
                served_traffic: job
                    .spec
                    .data
                    .served_traffic
                    .as_ref()
                    .map(|traffic| traffic.rollout.clone()),
                data_range: dataset::ranges(job).map(|(train, _)| train),
                seed: Some(job.spec.seed),
                code_version: Some(
                    job.spec
                        .image
                        .clone()
                        .unwrap_or_else(|| b.observed.settings.image.clone()),
                ),
                parent: warm_start
                    .and(job.spec.warm_start_from.as_ref())
                    .map(|parent| parent.name.clone()),
            },
            metrics: metrics.clone(),
            validation: job.spec.validation.clone(),
        },
    );
    version.metadata = ObjectMeta {
        name: Some(name.clone()),
        namespace: job.namespace(),
        labels: Some(BTreeMap::from([
            (LABEL_MODEL.to_owned(), job.spec.model.name.clone()),
            (gang::LABEL_JOB.to_owned(), name.clone()),
        ])),
        annotations: Some(BTreeMap::from([(
            ANNOTATION_JOB_UID.to_owned(),
            job.uid().unwrap_or_default(),
        )])),
        ..ObjectMeta::default()
    };
    b.model_version = Some(version);
    b.status.metrics = Some(metrics);
    b.status.model_version = Some(name.clone());
    if let Some(convergence) = &result.convergence {
        // The trainer counts epochs from 0, people from 1.
        let best_epoch = convergence.best_epoch.map(|epoch| epoch + 1);
        b.status.convergence = Some(ConvergenceStatus {
            epochs_trained: convergence.epochs_trained,
            best_epoch,
            stopped_early: convergence.stopped_early,
        });
        if convergence.stopped_early {
            let best = best_epoch.map_or_else(|| "n/a".to_owned(), |epoch| epoch.to_string());
            b.event(
                false,
                "StoppedEarly",
                "Train",
                format!(
                    "held-out log loss stopped improving: trained {} of {} epochs, kept epoch {best}",
                    convergence.epochs_trained, job.spec.epochs
                ),
            );
        }
    }
    if let Some(tuning) = &result.tuning {
        let status = tuning.status();
        if let Some(best) = status.trials.iter().find(|t| t.trial == status.best_trial) {
            b.event(
                false,
                "Tuned",
                "Train",
                format!(
                    "trial {} of {} kept: validation log loss {} (learning rate {}, embedding {}, hidden {:?})",
                    best.trial,
                    status.trials.len(),
                    best.validation_log_loss,
                    best.learning_rate,
                    best.embedding_dim,
                    best.hidden_layers
                ),
            );
        }
        b.status.tuning = Some(status);
    }
    let total = b.status.progress.as_ref().and_then(|p| p.total_steps);
    b.status.progress = Some(TrainingProgress {
        step: result.steps,
        total_steps: total.or(Some(result.steps)),
        epoch: b.status.progress.as_ref().and_then(|p| p.epoch),
        percent: Some("100%".to_owned()),
        samples_per_second: result.samples_per_second,
        loss: b.status.progress.as_ref().and_then(|p| p.loss),
    });
    // Parameter servers are done when the workers are; remove them now rather than wait for them to exit.
    for pod in &b.observed.pods {
        if member_of(pod).is_some_and(|m| m.role == Role::Server)
            && pod.metadata.deletion_timestamp.is_none()
        {
            b.delete_pods.push(pod.name_any());
        }
    }
    b.finish(TrainingPhase::Succeeded);
    b.set(
        CONDITION_COMPLETE,
        ConditionStatus::True,
        "ModelVersionCreated",
        format!("produced ModelVersion {name}"),
    );
    b.event(
        false,
        "Succeeded",
        "Train",
        format!(
            "produced ModelVersion {name} (AUC {})",
            result
                .metrics
                .auc
                .map_or_else(|| "n/a".to_owned(), |auc| format!("{auc:.4}"))
        ),
    );
}
