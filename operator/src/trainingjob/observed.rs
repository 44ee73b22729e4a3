//! What a TrainingJob reconcile observed: the job, its pods, its quota, its warm-start version, the chief's
//! progress and the training-set step; the plan reads nothing else.

use flywheel_crds::trainingjob::TrainingProgress;
use flywheel_crds::{GPUQuota, TrainingJob};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Pod;

use super::dataset::DatasetObservation;
use super::gang::TrainerSettings;

/// The ModelVersion a job warm-starts from, as far as the operator knows.
#[derive(Debug, Clone, PartialEq)]
pub enum WarmStart {
    NotRequested,
    Missing(String),
    Found { uri: String, sha256: String },
}

pub struct Observed<'a> {
    pub job: &'a TrainingJob,
    /// Pods this job owns, of any attempt.
    pub pods: Vec<&'a Pod>,
    /// The quota the job names, when it names one and it exists.
    pub quota: Option<&'a GPUQuota>,
    pub warm_start: WarmStart,
    /// The chief's latest progress, when it could be read.
    pub progress: Option<TrainingProgress>,
    pub settings: &'a TrainerSettings,
    /// The training-set step of a job on a FeatureView.
    pub dataset: DatasetObservation,
    pub now: Timestamp,
}
