//! The command line: every subcommand and its flags.

use std::path::PathBuf;

use flywheel_ml::calibration::CalibrationMethod;
use flywheel_ml::model::Architecture;
use serde_json::json;

use crate::{featurestore, traffic_log, traffic_set, training_set};
use clap::{Parser, Subcommand};
use flywheel_crds::common::parse_duration;

#[derive(Parser)]
#[command(
    name = "flywheel-trainer",
    version,
    about = "Flywheel training: data generation and model training"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Write a synthetic CTR data set: train.parquet, eval.parquet (the last share of time) and schema.json.
    Generate {
        #[arg(long, default_value_t = 100_000)]
        rows: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, default_value_t = 10_000)]
        users: u32,
        #[arg(long, default_value_t = 2_000)]
        items: u32,
        /// Rows per hashed id table in the written schema.
        #[arg(long, default_value_t = 100_000)]
        buckets: u64,
        #[arg(long, default_value_t = 0.2)]
        eval_fraction: f64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Train a model on Parquet data and write its artifact (one process, or a worker with `--ps`).
    Train(Box<TrainArgs>),
    /// Serve one parameter-server shard until every worker is done.
    Ps(PsArgs),
    /// Convert MovieLens-100k (`ml-100k.inter/.user/.item`) into a CTR data set split by time.
    Movielens {
        /// Directory holding the ml-100k files (see scripts/fetch-movielens.sh).
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        out: PathBuf,
    },
    /// Score a Parquet data set with a model artifact (batch inference): one click probability per row, in row
    /// order, as a JSON array. The same function the trainer evaluates with, so online scores can be checked
    /// against it.
    Score {
        /// The artifact (`model.fwm`); its `.sha256` beside it is verified.
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        data: PathBuf,
        #[arg(long, default_value = "clicked")]
        label: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Materialize a FeatureView: source events → offline feature table (Parquet, by date) + online store
    /// (Redis), statistics and drift; the report is the termination message.
    Materialize(Box<featurestore::MaterializeArgs>),
    /// Build a training set: point-in-time correct features for labeled events, or sample joining of
    /// impressions, clicks and conversions.
    BuildDataset(Box<featurestore::BuildDatasetArgs>),
    /// Build a TrainingJob's train and eval sets from a FeatureView and labeled events, and the model's
    /// feature schema (`train.parquet`, `eval.parquet`, `schema.json`); the summary is the termination message.
    TrainingSet(Box<training_set::TrainingSetArgs>),
    /// Build a TrainingJob's train and eval sets from a Rollout's served traffic (one row per prediction, the
    /// features as scored, `clicked` from the clicks) and the served model's schema.
    TrafficTrainingSet(Box<traffic_set::TrafficSetArgs>),
    /// Write a Rollout's served traffic (prediction log and clicks from Kafka) into the offline store as
    /// Parquet parts; runs until stopped.
    LogTraffic(Box<traffic_log::LogTrafficArgs>),
    /// Write synthetic feature events (`events.parquet`) and labeled events (`labels.parquet`).
    GenerateEvents(featurestore::GenerateEventsArgs),
    /// Write the model inputs of a Parquet data set after the schema's transforms (`c<i>`, `x<j>`, `label`,
    /// `group`), so a reference implementation outside Flywheel trains on exactly the same features.
    Encode {
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        schema: PathBuf,
        #[arg(long, default_value = "clicked")]
        label: String,
        #[arg(long, default_value = "user_id")]
        group: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
pub struct PsArgs {
    #[arg(long, env = "FLYWHEEL_LISTEN", default_value = "0.0.0.0:7070")]
    pub listen: std::net::SocketAddr,
    /// This shard's index (0 holds the dense parameters).
    #[arg(long, env = "FLYWHEEL_SHARD", default_value_t = 0)]
    pub shard: u32,
    #[arg(long, env = "FLYWHEEL_WORKERS", default_value_t = 1)]
    pub workers: u32,
    #[arg(long, value_parser = parse_architecture, default_value = "deepfm")]
    pub architecture: Architecture,
    #[arg(long, default_value_t = 16)]
    pub embedding_dim: usize,
    #[arg(long, default_value = "adagrad")]
    pub sparse_optimizer: String,
    #[arg(long, default_value_t = 0.05)]
    pub sparse_learning_rate: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A worker silent this long fails the shard (the gang restarts from its checkpoint).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub worker_timeout: std::time::Duration,
    /// Where the shard writes `ps-shard-<I>.fwt` when the chief asks; an existing one is loaded at start.
    #[arg(long, env = "FLYWHEEL_CHECKPOINT_DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    /// Start from this artifact's embedding rows (those hashing to this shard), unless a checkpoint exists.
    #[arg(long, env = "FLYWHEEL_WARM_START")]
    pub warm_start: Option<PathBuf>,
    /// Expected SHA-256 of the warm-start artifact.
    #[arg(long, env = "FLYWHEEL_WARM_START_SHA256")]
    pub warm_start_sha256: Option<String>,
    /// Shards of the job (which rows of a warm-start artifact are this shard's).
    #[arg(long, env = "FLYWHEEL_SHARDS")]
    pub shards: Option<u32>,
    /// The gang token (the TrainingJob's Secret) every call must carry; without it calls are not checked.
    #[arg(long, env = "FLYWHEEL_GANG_TOKEN_FILE")]
    pub gang_token_file: Option<PathBuf>,
}

#[derive(clap::Args)]
// A local rank is started with the launcher's own flags plus overrides (`launcher::local_rank_flags`).
#[command(args_override_self = true)]
pub struct TrainArgs {
    #[arg(long, env = "FLYWHEEL_TRAIN_DATA")]
    pub train: PathBuf,
    #[arg(long, env = "FLYWHEEL_EVAL_DATA")]
    pub eval: PathBuf,
    /// Feature schema JSON (`{"features": [...]}`), as the FeatureView defines it.
    #[arg(long, env = "FLYWHEEL_SCHEMA")]
    pub schema: PathBuf,
    #[arg(long, default_value = "clicked")]
    pub label: String,
    /// Column grouping examples for GAUC (e.g. the user).
    #[arg(long, default_value = "user_id")]
    pub group: String,
    #[arg(long, value_parser = parse_architecture, default_value = "deepfm")]
    pub architecture: Architecture,
    #[arg(long, default_value_t = 16)]
    pub embedding_dim: usize,
    /// MLP widths, comma-separated (ignored by logistic).
    #[arg(long, value_delimiter = ',', default_value = "400,400")]
    pub hidden: Vec<usize>,
    /// Passes over the training set; with early stopping (`--patience`), the most it trains.
    #[arg(long, default_value_t = DEFAULT_EPOCHS)]
    pub epochs: usize,
    #[arg(long, default_value_t = 1024)]
    pub batch_size: usize,
    /// Dense (Adam) learning rate.
    #[arg(long, default_value_t = DEFAULT_LEARNING_RATE)]
    pub learning_rate: f64,
    /// Early stopping: epochs without a lower validation log loss before training stops, keeping the best
    /// epoch's weights; 0 trains every epoch. Not available to parameter-server workers, which train every epoch.
    #[arg(long, default_value_t = 2)]
    pub patience: usize,
    /// Share of the training set (its last rows: the newest, in a time-ordered set) held out for early stopping
    /// and calibration; 0 holds out nothing (no early stopping, no calibration).
    #[arg(long, default_value_t = 0.1)]
    pub validation_fraction: f64,
    /// The dense learning rate rises linearly from 0 over these first steps.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// Both learning rates are multiplied by this after an epoch without a lower validation log loss.
    #[arg(long, default_value_t = 0.5)]
    pub plateau_decay: f64,
    /// L2 penalty on the dense weights.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Post-training calibration fitted on the validation set and stored in the artifact: platt, isotonic or
    /// none.
    #[arg(long, value_parser = parse_calibration, default_value = "platt")]
    pub calibration: CalibrationMethod,
    /// Embedding optimizer: adagrad, adam or sgd.
    #[arg(long, default_value = "adagrad")]
    pub sparse_optimizer: String,
    #[arg(long, default_value_t = 0.05)]
    pub sparse_learning_rate: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Random search: this many trials (trial 0 is the settings above), the lowest validation log loss wins.
    /// One process only (not with --ps or --data-parallel).
    #[arg(long, env = "FLYWHEEL_TUNE_TRIALS", default_value_t = 0)]
    pub tune_trials: usize,
    /// The search space as JSON: `learningRate`, `sparseLearningRate`, `weightDecay` (`{min, max, scale:
    /// log|linear}`), `embeddingDim` (a list), `hiddenLayers` (a list of lists).
    #[arg(long, env = "FLYWHEEL_TUNE_SPACE")]
    pub tune_space: Option<String>,
    /// Directory the artifact (`model.fwm`, `model.fwm.sha256`) is written to.
    #[arg(long, env = "FLYWHEEL_OUTPUT")]
    pub output: PathBuf,
    /// Where the final result is written for the operator.
    #[arg(
        long,
        env = "FLYWHEEL_TERMINATION_LOG",
        default_value = "/dev/termination-log"
    )]
    pub termination_log: PathBuf,
    /// Report progress every this many steps.
    #[arg(long, default_value_t = 50)]
    pub progress_every: u64,
    /// Directory of `checkpoint.fwc`; an existing checkpoint there is resumed (a restarted gang continues).
    #[arg(long, env = "FLYWHEEL_CHECKPOINT_DIR")]
    pub checkpoint_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    pub checkpoint_every: u64,
    /// Start from this artifact's weights (incremental training).
    #[arg(long, env = "FLYWHEEL_WARM_START")]
    pub warm_start: Option<PathBuf>,
    /// Expected SHA-256 of the warm-start artifact.
    #[arg(long, env = "FLYWHEEL_WARM_START_SHA256")]
    pub warm_start_sha256: Option<String>,
    /// Parameter-server shards (`host:port`, comma-separated, in shard order): train as a PS worker.
    #[arg(long, env = "FLYWHEEL_PS_ADDRS", value_delimiter = ',')]
    pub ps: Vec<String>,
    /// This worker's rank; rank 0 (the chief) writes the artifact.
    #[arg(long, env = "FLYWHEEL_RANK", default_value_t = 0)]
    pub rank: u32,
    #[arg(long, env = "FLYWHEEL_WORKERS", default_value_t = 1)]
    pub workers: u32,
    /// Steps between dense-parameter averaging through shard 0.
    #[arg(long, default_value_t = 20)]
    pub sync_every: u64,
    /// The data-parallel chief (`host:port` of rank 0's collective): train as one rank of a synchronous
    /// data-parallel gang of `--workers`.
    #[arg(long, env = "FLYWHEEL_DP_CHIEF")]
    pub data_parallel: Option<String>,
    /// Where rank 0 of a data-parallel gang serves the collective.
    #[arg(long, env = "FLYWHEEL_LISTEN", default_value = "0.0.0.0:7070")]
    pub listen: std::net::SocketAddr,
    /// A data-parallel rank silent this long fails the gang (the operator restarts it from its checkpoint).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub worker_timeout: std::time::Duration,
    /// The gang token (the TrainingJob's Secret): sent with every call to the shards or the chief, and
    /// required of every call to this rank's collective.
    #[arg(long, env = "FLYWHEEL_GANG_TOKEN_FILE")]
    pub gang_token_file: Option<PathBuf>,
    /// How long to keep trying to reach the shards (or the data-parallel chief) at start.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub connect_timeout: std::time::Duration,
    /// Threads of burn's CPU kernels. Unset (and no `RAYON_NUM_THREADS`): the trainer times a few steps of this
    /// model with 1, 2, 4, … and every core, and trains with the fastest (narrow models train faster on one).
    #[arg(long, env = "FLYWHEEL_CPU_THREADS")]
    pub cpu_threads: Option<usize>,
    /// Where to train: `cpu` (burn's CPU backend) or `cuda[:N]` (GPU N with burn-cuda; needs a binary
    /// built with `--features cuda`). A data-parallel gang runs one process per GPU, each with its own device.
    #[arg(long, env = "FLYWHEEL_DEVICE", value_parser = parse_device, default_value = "cpu")]
    pub device: TrainDevice,
    /// Data-parallel ranks this process starts, one per device (a worker given N GPUs trains with N processes):
    /// local rank i is global rank `rank × N + i` of `workers × N`, on `cuda:i` (or the CPU).
    #[arg(long, env = "FLYWHEEL_LOCAL_RANKS", default_value_t = 1)]
    pub local_ranks: u32,
    /// Where the chief (rank 0) serves its latest progress as JSON at `GET /progress` for the operator to poll
    /// (conventionally 0.0.0.0:7071); other ranks ignore it, and nothing is served when unset.
    #[arg(long, env = "FLYWHEEL_STATUS_LISTEN")]
    pub status_listen: Option<std::net::SocketAddr>,
}

/// The device a training process computes on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TrainDevice {
    Cpu,
    Cuda(usize),
}

pub fn parse_device(text: &str) -> Result<TrainDevice, String> {
    match text.split_once(':') {
        None if text == "cpu" => Ok(TrainDevice::Cpu),
        None if text == "cuda" => Ok(TrainDevice::Cuda(0)),
        Some(("cuda", index)) => index
            .parse()
            .map(TrainDevice::Cuda)
            .map_err(|_| format!("`{text}`: the GPU index must be a number, as in cuda:0")),
        _ => Err(format!("`{text}`: use cpu, cuda or cuda:N")),
    }
}

pub fn parse_calibration(text: &str) -> Result<CalibrationMethod, String> {
    serde_json::from_value(json!(text))
        .map_err(|_| format!("`{text}`: use platt, isotonic or none"))
}

pub fn parse_architecture(text: &str) -> Result<Architecture, String> {
    serde_json::from_value(json!(text))
        .map_err(|_| format!("`{text}`: use logistic, wide_deep or deepfm"))
}

/// The most epochs a job trains by default; early stopping usually ends it sooner.
pub const DEFAULT_EPOCHS: usize = 100;

pub const DEFAULT_LEARNING_RATE: f64 = 0.003;
