//! `TrainingJob`: one training run of a CTR model, on a parameter-server or GPU data-parallel topology, admitted
//! as a gang under a `GPUQuota`, producing a `ModelVersion`.

use k8s_openapi::api::core::v1::ResourceRequirements;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::common::{
    DNS_LABEL_PATTERN, Duration, GPU_RESOURCE_PATTERN, LocalRef, TimeRange, is_gpu_resource,
};
use crate::featureview::STORAGE_URI_PATTERN;
use crate::modelversion::{OfflineMetrics, Validation};
use crate::tuning::{Tuning, TuningStatus};

mod validation;

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

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.featureView) ? 1 : 0) + (has(self.servedTraffic) ? 1 : 0) + (has(self.dataset) ? 1 : 0) == 1").message("spec.data: set exactly one of featureView, servedTraffic or dataset"))]
pub struct TrainingData {
    /// Build the training set from a FeatureView with point-in-time joins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub feature_view: Option<FeatureViewData>,
    /// Build the training set from what a Rollout served: one row per logged prediction, with the features as
    /// they were scored, labeled by its clicks. The model keeps the served model's feature schema.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub served_traffic: Option<ServedTrafficData>,
    /// Use ready-made Parquet training and evaluation sets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<DatasetUris>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FeatureViewData {
    /// The FeatureView, in the job's namespace, whose features are joined onto the events as of each event's
    /// time (point in time: no feature from after the event).
    #[schemars(pattern(DNS_LABEL_PATTERN), length(max = 63))]
    pub name: String,
    /// Labeled events: a Parquet file or directory on the training storage (`file://`) with the view's join
    /// keys, the event time and the label. Each event is one training row.
    #[schemars(pattern(STORAGE_URI_PATTERN), length(max = 2048))]
    pub events: String,
    /// Event-time column of the events.
    #[serde(default = "default_event_time")]
    #[schemars(length(min = 1, max = 63))]
    pub timestamp_field: String,
    /// Label column of the events (e.g. `clicked`). With `sampleJoin`, `label_click` or `label_convert`: the
    /// labels sample joining writes.
    #[schemars(length(min = 1, max = 63))]
    pub label: String,
    /// The events are impressions without labels: label each by joining its clicks (and their conversions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_join: Option<SampleJoinData>,
    /// Events whose time falls in this range train the model: `start` and `end`, or `last` (e.g. `7d`): that
    /// long before the evaluation range starts.
    pub train_range: EventRange,
    /// Events in this range evaluate it: `start` and `end`, or `last` (e.g. `1d`): that long before the job
    /// was created. It must start at or after the end of `trainRange`, so evaluation never sees the training
    /// period.
    pub eval_range: EventRange,
}

/// Impressions labeled by their clicks: `label_click` when a click with the impression's request id follows it
/// within `clickWindow`, `label_convert` when one of those clicks is followed by a conversion with its click id
/// within `conversionWindow`. A click counted twice never duplicates its impression.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SampleJoinData {
    /// Clicks: a Parquet file or directory (`file://`) with the request id, the click id and the event time.
    #[schemars(pattern(STORAGE_URI_PATTERN), length(max = 2048))]
    pub clicks: String,
    /// Conversions: a Parquet file or directory (`file://`) with the click id and the event time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(STORAGE_URI_PATTERN), length(max = 2048))]
    pub conversions: Option<String>,
    /// How long after its impression a click counts (default `30m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub click_window: Option<Duration>,
    /// How long after its click a conversion counts (default `7d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversion_window: Option<Duration>,
    /// Request id column of the impressions and the clicks (default `request_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub request_id_column: Option<String>,
    /// Click id column of the clicks and the conversions (default `click_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub click_id_column: Option<String>,
}

impl SampleJoinData {
    pub fn click_window(&self) -> &str {
        self.click_window.as_ref().map_or("30m", |d| d.0.as_str())
    }

    pub fn conversion_window(&self) -> &str {
        self.conversion_window
            .as_ref()
            .map_or("7d", |d| d.0.as_str())
    }

    pub fn request_id_column(&self) -> &str {
        self.request_id_column.as_deref().unwrap_or("request_id")
    }

    pub fn click_id_column(&self) -> &str {
        self.click_id_column.as_deref().unwrap_or("click_id")
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServedTrafficData {
    /// The Rollout, in the job's namespace, whose `spec.feedback.trafficLog` holds the traffic. Its stable
    /// version's artifact gives the feature schema.
    #[schemars(pattern(DNS_LABEL_PATTERN), length(max = 63))]
    pub rollout: String,
    /// A click labels its prediction when it arrives within this long of it (default `30m`). Predictions whose
    /// window has not closed by the end of the log are left out, not counted as negatives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub click_window: Option<Duration>,
    /// Predictions served in this range train the model: `start` and `end`, or `last` (e.g. `7d`) before the
    /// evaluation range starts.
    pub train_range: EventRange,
    /// Predictions served in this range evaluate it: `start` and `end`, or `last` (e.g. `1d`) before the job
    /// was created.
    pub eval_range: EventRange,
}

impl ServedTrafficData {
    pub const DEFAULT_CLICK_WINDOW: &str = "30m";

    /// The absolute (train, eval) ranges for a job created at `created`.
    pub fn ranges(&self, created: jiff::Timestamp) -> Option<(TimeRange, TimeRange)> {
        resolve_ranges(&self.train_range, &self.eval_range, created)
    }

    pub fn click_window(&self) -> &str {
        self.click_window
            .as_ref()
            .map_or(Self::DEFAULT_CLICK_WINDOW, |w| w.0.as_str())
    }
}

/// Evaluation counts back from `created`, training from the evaluation's start.
fn resolve_ranges(
    train: &EventRange,
    eval: &EventRange,
    created: jiff::Timestamp,
) -> Option<(TimeRange, TimeRange)> {
    let eval = eval.resolve(created)?;
    let train = train.resolve(eval.start.0)?;
    Some((train, eval))
}

/// A range of event times: absolute (`start`, `end`) or relative (`last`).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(has(self.start) && has(self.end)) != has(self.last)").message("set start and end, or last"))]
pub struct EventRange {
    /// Inclusive start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<Time>,
    /// Exclusive end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<Time>,
    /// The span before a reference time (the job's creation, or the evaluation range's start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<Duration>,
}

impl EventRange {
    /// The absolute range: as given, or `last` before `reference`; `None` when neither form is complete or
    /// `last` does not parse.
    pub fn resolve(&self, reference: jiff::Timestamp) -> Option<TimeRange> {
        match (&self.start, &self.end, &self.last) {
            (Some(start), Some(end), None) => Some(TimeRange {
                start: start.clone(),
                end: end.clone(),
            }),
            (None, None, Some(last)) => {
                let span = jiff::SignedDuration::try_from(last.parse().ok()?).ok()?;
                Some(TimeRange {
                    start: Time(reference.checked_sub(span).ok()?),
                    end: Time(reference),
                })
            }
            _ => None,
        }
    }
}

impl FeatureViewData {
    /// The absolute (train, eval) ranges for a job created at `created`.
    pub fn ranges(&self, created: jiff::Timestamp) -> Option<(TimeRange, TimeRange)> {
        resolve_ranges(&self.train_range, &self.eval_range, created)
    }
}

fn default_event_time() -> String {
    "event_timestamp".to_owned()
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatasetUris {
    /// Training set: a Parquet file or directory (`file://` on the training storage).
    #[schemars(pattern(STORAGE_URI_PATTERN), length(max = 2048))]
    pub train: String,
    /// Evaluation set, scored after training for the offline metrics: a Parquet file or directory (`file://`
    /// on the training storage).
    #[schemars(pattern(STORAGE_URI_PATTERN), length(max = 2048))]
    pub eval: String,
    /// Label column (e.g. `clicked`).
    #[schemars(length(min = 1, max = 63))]
    pub label: String,
    /// Feature schema JSON the features are encoded with; defaults to `schema.json` beside `train`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(pattern(STORAGE_URI_PATTERN), length(max = 2048))]
    pub schema: Option<String>,
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

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum TrainingPhase {
    Queued,
    Running,
    Restarting,
    Suspended,
    Succeeded,
    Failed,
}

/// Observed state of a TrainingJob, written by the operator: phase, queue position, pods, progress, metrics
/// and restarts.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingJobStatus {
    /// The `metadata.generation` the operator last reconciled; while it is behind, the status does not reflect
    /// the latest spec yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard Kubernetes conditions. Types: `Ready`; `InvalidSpec` (True when the spec breaks a rule, the
    /// message naming each field); `DatasetBuilt` (the training set was built from the FeatureView);
    /// `Admitted` (admitted, or why it waits); `PodsScheduled` and `PodsStarted` (False, with the reason, while
    /// the gang's pods cannot be scheduled or their containers cannot start); `Complete` (True once the
    /// ModelVersion was created); `Failed` (True, with the reason, when the job failed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
    /// `Queued` (waiting for admission, its training set or its warm-start version), `Running`, `Restarting`
    /// (the gang restarts from its last checkpoint after a failure), `Suspended` (`spec.suspend`), `Succeeded`
    /// or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<TrainingPhase>,
    /// Topology summary (printer column), e.g. `ps 2x4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<String>,
    /// While `Queued`: why, and the place in the queue (1 = next).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<QueueStatus>,
    /// Pods of the current attempt, per role (`worker`, `server`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicas: Vec<ReplicaStatus>,
    /// Training progress as the chief worker last reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<TrainingProgress>,
    /// Offline metrics on the evaluation set, once training succeeded; copied to the ModelVersion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<OfflineMetrics>,
    /// How training ended: epochs trained, the epoch whose weights were kept, and whether it stopped early.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub convergence: Option<ConvergenceStatus>,
    /// The search's trials and the one registered, when `spec.tuning` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tuning: Option<TuningStatus>,
    /// Gang restarts after a failure so far (counted against `backoffLimit`), and why.
    #[serde(default)]
    pub restarts: u32,
    /// Generation of the gang's pods: every restart, preemption or resume after suspension starts a new one,
    /// and pods of an older attempt are removed before the new attempt's pods are made.
    #[serde(default)]
    pub attempt: u32,
    /// Why the gang was restarted, oldest first (the last 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restart_reasons: Vec<String>,
    /// When the gang's pods were first created (the first attempt's start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// When the job succeeded or failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The ModelVersion this job produced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_version: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConvergenceStatus {
    /// Epochs trained (at most `spec.epochs`).
    #[schemars(range(min = 0, max = 1000))]
    pub epochs_trained: u32,
    /// The epoch (counting from 1) whose weights the model keeps: the lowest held-out log loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub best_epoch: Option<u32>,
    /// Whether early stopping ended training before `spec.epochs`.
    #[serde(default)]
    pub stopped_early: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct QueueStatus {
    /// Why the job waits, e.g. no room in its GPUQuota, preempted, its training set being built, or its
    /// warm-start ModelVersion missing.
    pub reason: String,
    /// Place in the GPUQuota's queue (1 = admitted next); absent when the job does not wait for the quota.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u32>,
    /// When the job started waiting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// `worker` or `server`.
    pub role: String,
    /// Pods the topology asks for in this role.
    pub desired: u32,
    /// Pods of this role that exist and have not finished (pending or running).
    #[serde(default)]
    pub active: u32,
    /// Pods of this role that exited successfully.
    #[serde(default)]
    pub succeeded: u32,
    /// Pods of this role that failed.
    #[serde(default)]
    pub failed: u32,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrainingProgress {
    /// Training steps (mini-batches) done so far.
    pub step: u64,
    /// Steps planned for all of `spec.epochs`; early stopping may end training sooner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<u64>,
    /// Current epoch, counting from 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u32>,
    /// Completed share as text (printer column), e.g. `42%`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<String>,
    /// Training throughput in rows per second since the chief's previous report: the whole gang's in a
    /// data-parallel job, the chief worker's own in a parameter-server job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub samples_per_second: Option<f64>,
    /// Training loss (log loss) of the latest reported mini-batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
}

impl TrainingJobSpec {
    pub const DEFAULT_START_TIMEOUT: &str = "5m";

    pub fn start_timeout(&self) -> Duration {
        self.start_timeout
            .clone()
            .unwrap_or_else(|| Duration::from(Self::DEFAULT_START_TIMEOUT))
    }
}
