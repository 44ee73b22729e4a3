//! `TrainingJob`: one training run of a CTR model, on a parameter-server or GPU data-parallel topology, admitted
//! as a gang under a `GPUQuota`, producing a `ModelVersion`.

use k8s_openapi::api::core::v1::ResourceRequirements;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{DNS_LABEL_PATTERN, Duration, GPU_RESOURCE_PATTERN, LocalRef, is_gpu_resource};
use crate::featureview::STORAGE_URI_PATTERN;
use crate::modelversion::Validation;
use crate::tuning::Tuning;

mod data;
mod status;
mod validation;

pub use data::{
    DatasetUris, EventRange, FeatureViewData, SampleJoinData, ServedTrafficData, TrainingData,
};
pub use status::{
    ConvergenceStatus, QueueStatus, ReplicaStatus, TrainingJobStatus, TrainingPhase,
    TrainingProgress,
};

/// Desired state of a TrainingJob: the data, the model and how to train it, the pod topology, and where the
/// artifact goes. On success the job creates a ModelVersion of the same name.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "flywheel.dev",
    version = "v1alpha1",
    kind = "TrainingJob",
    namespaced,
    status = "TrainingJobStatus",
    shortname = "tj",
    category = "flywheel",
    derive = "PartialEq",
    doc = "One training run of a CTR model on a parameter-server or data-parallel topology.",
    printcolumn(name = "Topology", type_ = "string", json_path = ".status.topology"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Progress",
        type_ = "string",
        json_path = ".status.progress.percent"
    ),
    printcolumn(name = "AUC", type_ = "number", json_path = ".status.metrics.auc"),
    printcolumn(
        name = "Model Version",
        type_ = "string",
        json_path = ".status.modelVersion",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TrainingJobSpec {
    /// Training and evaluation data.
    pub data: TrainingData,
    /// The model to train: its registry name, architecture and embedding sizes.
    pub model: ModelArchitecture,
    /// Optimizer settings. Dense weights always train with Adam; `kind` picks the embedding optimizer. Default
    /// `kind: adam`, `learningRate: 0.003`.
    #[serde(default)]
    pub optimizer: Optimizer,
    /// The most passes over the training set; early stopping usually ends training sooner.
    #[serde(default = "default_epochs")]
    #[schemars(range(min = 1, max = 1000))]
    pub epochs: u32,
    /// Early stopping on a held-out share of the training data. On by default.
    #[serde(default)]
    pub early_stopping: EarlyStopping,
    /// How the model's probabilities are calibrated after training, on the held-out share: the calibrator is
    /// stored in the artifact and applied by evaluation, batch scoring and serving alike.
    #[serde(default)]
    pub calibration: CalibrationMethod,
    /// Rows per training step. A data-parallel gang splits each batch among its training processes; each
    /// parameter-server worker trains batches of this size on its own. Default 1024.
    #[serde(default = "default_batch_size")]
    #[schemars(range(min = 1, max = 1_048_576))]
    pub batch_size: u32,
    /// Seed of every random choice: same seed and data give the same weights.
    #[serde(default)]
    pub seed: u64,
    /// Continue training from this ModelVersion's weights (incremental training).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_start_from: Option<LocalRef>,
    /// Search the training settings (random search; `single` topology, not with `warmStartFrom`); the best
    /// trial's model is registered and the trials table is in `status.tuning`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tuning: Option<Tuning>,
    /// Exactly one of `single`, `parameterServer`, `dataParallel`.
    pub topology: Topology,
    /// Pod resources per role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<RoleResources>,
    /// Trainer image; defaults to the operator's `flywheel-trainer` image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 512))]
    pub image: Option<String>,
    /// The GPUQuota (cluster-scoped) this job is admitted under; required when the job asks for GPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(DNS_LABEL_PATTERN), length(max = 63))]
    pub queue: Option<String>,
    /// Admission priority within the queue; higher first.
    #[serde(default)]
    #[schemars(range(min = -1000, max = 1000))]
    pub priority: i32,
    /// Where and how often training state is checkpointed. Without it, checkpoints go under the job's artifact
    /// directory every 1000 steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint: Option<Checkpointing>,
    /// Whole-gang restarts (from the last checkpoint) before the job fails.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0, max = 100))]
    pub backoff_limit: u32,
    /// How long the kubelet may fail to start a gang's containers (an image it cannot pull, a missing Secret
    /// or ConfigMap) before the job fails with its reason and gives its GPUs back; default `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timeout: Option<Duration>,
    /// Where the model artifact is written.
    pub output: TrainingOutput,
    /// Gates of the ModelVersion this job creates: absolute bounds, or a change versus another version or the
    /// holder of an alias such as `production`. The version is `Validated` or `Rejected` by them; without
    /// gates it is validated against nothing, and its `Validated` condition says so.
    #[serde(default, skip_serializing_if = "Validation::is_empty")]
    pub validation: Validation,
    /// While true no pods run; running pods are removed (progress is kept in checkpoints).
    #[serde(default)]
    pub suspend: bool,
}

fn default_epochs() -> u32 {
    100
}

/// Early stopping: after every epoch the model is scored on the held-out share; an epoch that does not lower
/// its log loss halves the learning rates, and `patience` such epochs in a row end training with the best
/// epoch's weights. Parameter-server jobs train every epoch (their workers hold different dense weights
/// between syncs) but still hold out the share for calibration.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EarlyStopping {
    /// Epochs without improvement before training stops; 0 trains every epoch.
    #[serde(default = "default_patience")]
    #[schemars(range(min = 0, max = 100))]
    pub patience: u32,
    /// Share of the training rows held out (the last rows, the newest in a time-ordered set); 0 holds out
    /// nothing, which also turns off early stopping and calibration.
    #[serde(default = "default_validation_fraction")]
    #[schemars(range(min = 0.0, max = 0.5))]
    pub validation_fraction: f64,
}

impl Default for EarlyStopping {
    fn default() -> Self {
        EarlyStopping {
            patience: default_patience(),
            validation_fraction: default_validation_fraction(),
        }
    }
}

fn default_patience() -> u32 {
    2
}

fn default_validation_fraction() -> f64 {
    0.1
}

/// Post-training calibration of click probabilities.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum CalibrationMethod {
    /// Platt scaling (a logistic fit on the logit): keeps the ranking, works on a few thousand rows.
    #[default]
    Platt,
    /// Isotonic regression: any monotone shape, for large held-out sets.
    Isotonic,
    /// The model's own sigmoid.
    None,
}

impl CalibrationMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            CalibrationMethod::Platt => "platt",
            CalibrationMethod::Isotonic => "isotonic",
            CalibrationMethod::None => "none",
        }
    }
}

fn default_batch_size() -> u32 {
    1024
}

fn default_backoff_limit() -> u32 {
    3
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelArchitecture {
    /// Registry name of the model; ModelVersions of this job are named after it.
    #[schemars(pattern(DNS_LABEL_PATTERN), length(max = 40))]
    pub name: String,
    /// `logistic` (logistic regression), `wide_deep` (Wide & Deep) or `deepfm` (DeepFM). Wide & Deep and DeepFM
    /// need `hiddenLayers`; logistic takes none.
    pub architecture: Architecture,
    /// Width of each embedding vector, 1 to 1024. Default 16.
    #[serde(default = "default_embedding_dim")]
    #[schemars(range(min = 1, max = 1024))]
    pub embedding_dim: u32,
    /// Widths of the MLP layers (wide_deep, deepfm); empty for logistic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(range(min = 1, max = 65536)))]
    pub hidden_layers: Vec<u32>,
    /// Rows per embedding table (ids are hashed into this many rows).
    #[serde(default = "default_embedding_rows")]
    #[schemars(range(min = 1, max = 1_000_000_000))]
    pub embedding_rows: u64,
}

fn default_embedding_dim() -> u32 {
    16
}

fn default_embedding_rows() -> u64 {
    100_000
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum Architecture {
    #[serde(rename = "logistic")]
    Logistic,
    #[serde(rename = "wide_deep")]
    WideDeep,
    #[serde(rename = "deepfm")]
    DeepFm,
}

impl Architecture {
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::Logistic => "logistic",
            Architecture::WideDeep => "wide_deep",
            Architecture::DeepFm => "deepfm",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Optimizer {
    /// Optimizer of the sparse embedding rows: `adam`, `adagrad` or `sgd` (dense weights always use Adam).
    /// Default `adam`.
    #[serde(default = "default_optimizer_kind")]
    pub kind: OptimizerKind,
    /// Learning rate of the dense parameters.
    #[serde(default = "default_learning_rate")]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub learning_rate: f64,
    /// Learning rate of the sparse embedding rows; defaults to `learningRate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub sparse_learning_rate: Option<f64>,
    /// L2 penalty on the dense weights (Adam's weight decay).
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub weight_decay: f64,
    /// Steps over which the dense learning rate rises linearly from 0.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub warmup_steps: u64,
}

impl Default for Optimizer {
    fn default() -> Self {
        Optimizer {
            kind: default_optimizer_kind(),
            learning_rate: default_learning_rate(),
            sparse_learning_rate: None,
            weight_decay: 0.0,
            warmup_steps: 0,
        }
    }
}

fn default_optimizer_kind() -> OptimizerKind {
    OptimizerKind::Adam
}

fn default_learning_rate() -> f64 {
    0.003
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum OptimizerKind {
    Adam,
    Adagrad,
    Sgd,
}

/// How the job is laid out; written as one key (`parameterServer: {servers: 2, workers: 4}`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Topology {
    /// One worker, no parameter server.
    Single(SingleTopology),
    /// Embedding rows sharded over parameter servers, asynchronous CPU workers.
    ParameterServer(ParameterServerTopology),
    /// Synchronous data-parallel workers (dense gradients all-reduced), on GPUs or, with `gpusPerWorker: 0`,
    /// on CPUs.
    DataParallel(DataParallelTopology),
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SingleTopology {}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct ParameterServerTopology {
    /// Parameter-server pods the embedding rows are sharded over, 1 to 256.
    #[schemars(range(min = 1, max = 256))]
    pub servers: u32,
    /// Worker pods that train asynchronously, each on its share of the rows, 1 to 1024.
    #[schemars(range(min = 1, max = 1024))]
    pub workers: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataParallelTopology {
    /// Worker pods; worker 0 is the chief that coordinates the all-reduce and writes the model.
    #[schemars(range(min = 1, max = 1024))]
    pub workers: u32,
    /// GPUs each worker requests and trains on, one training process per GPU. 0 trains on the worker's CPUs
    /// with one process, asks for no GPU and needs no GPUQuota.
    #[schemars(range(min = 0, max = 16))]
    pub gpus_per_worker: u32,
    /// Extended resource each worker requests: `nvidia.com/gpu`, `amd.com/gpu` or a MIG profile
    /// (`nvidia.com/mig-1g.10gb`).
    #[serde(default = "default_gpu_resource")]
    #[schemars(pattern(GPU_RESOURCE_PATTERN))]
    pub gpu_resource: String,
    /// GPU product the workers must land on (node label `nvidia.com/gpu.product`), e.g. `NVIDIA-H100-80GB-HBM3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 63),
        pattern(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
    )]
    pub gpu_type: Option<String>,
}

fn default_gpu_resource() -> String {
    "nvidia.com/gpu".to_owned()
}

impl Topology {
    /// Short form for the printer column, e.g. `ps 2x4`, `dp 4x8 nvidia.com/gpu`.
    pub fn summary(&self) -> String {
        match self {
            Topology::Single(_) => "single".to_owned(),
            Topology::ParameterServer(ps) => format!("ps {}x{}", ps.servers, ps.workers),
            Topology::DataParallel(dp) if dp.gpus_per_worker == 0 => {
                format!("dp {}x cpu", dp.workers)
            }
            Topology::DataParallel(dp) => format!(
                "dp {}x{} {}",
                dp.workers, dp.gpus_per_worker, dp.gpu_resource
            ),
        }
    }

    /// GPUs the whole gang needs, by resource name.
    pub fn gpu_demand(&self) -> Option<(&str, u64)> {
        match self {
            Topology::DataParallel(dp) if dp.gpus_per_worker == 0 => None,
            Topology::DataParallel(dp) => Some((
                dp.gpu_resource.as_str(),
                u64::from(dp.workers) * u64::from(dp.gpus_per_worker),
            )),
            Topology::Single(_) | Topology::ParameterServer(_) => None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
pub struct RoleResources {
    /// Resources of each worker pod's trainer container. For data-parallel GPU workers, the GPU request and
    /// limit (`gpusPerWorker` of `gpuResource`) are added to them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<ResourceRequirements>,
    /// Resources of each parameter-server pod's container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ResourceRequirements>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Checkpointing {
    /// Where checkpoints go; a restarted gang resumes from the newest one.
    #[schemars(pattern(STORAGE_URI_PATTERN), length(max = 2048))]
    pub uri: String,
    /// Training steps between checkpoints. Default 1000.
    #[serde(default = "default_checkpoint_steps")]
    #[schemars(range(min = 1, max = 100_000_000))]
    pub every_steps: u64,
}

fn default_checkpoint_steps() -> u64 {
    1000
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingOutput {
    /// Base URI; the artifact lands under `<artifactUri>/<job name>/`.
    #[schemars(pattern(STORAGE_URI_PATTERN), length(max = 2048))]
    pub artifact_uri: String,
}

impl TrainingJobSpec {
    pub const DEFAULT_START_TIMEOUT: &str = "5m";

    pub fn start_timeout(&self) -> Duration {
        self.start_timeout
            .clone()
            .unwrap_or_else(|| Duration::from(Self::DEFAULT_START_TIMEOUT))
    }
}
