//! `flywheel-trainer`: the batch data plane a TrainingJob's pods run, also usable on a laptop.
//!
//! - `generate`: writes a seeded synthetic CTR data set (train/eval Parquet split by time, and its schema);
//! - `train`: trains a model on Parquet data and writes the artifact: in one process, as a parameter-server
//!   worker (`--ps`), or as a rank of a synchronous data-parallel gang (`--data-parallel`);
//! - `ps`: serves one parameter-server shard;
//! - `encode`: writes a data set's model inputs after the transforms (for reference implementations);
//! - `movielens`: converts MovieLens-100k into a CTR data set;
//! - `materialize`, `build-dataset`, `generate-events`: a FeatureView's batch side (see `featurestore`).
//!
//! Progress goes to stdout as JSON lines, and with `--status-listen` the chief also serves its latest progress
//! at `GET /progress` for the operator to poll; the final result also goes to the termination-message file
//! (`/dev/termination-log` unless `--termination-log` says otherwise), where the operator reads it.

mod collective;
mod cpu_threads;
mod dataset;
mod featurestore;
mod gang_auth;
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod huge_pages;
mod launcher;
mod movielens;
mod online_writer;
mod ps;
mod status;
mod training_set;
mod worker;

use flywheel_crds::common::parse_duration;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::AutodiffBackend;
use clap::{Parser, Subcommand};
use flywheel_ml::artifact::{self, FORMAT, Lineage, ModelCard};
use flywheel_ml::calibration::CalibrationMethod;
use flywheel_ml::embedding::SparseOptimizer;
use flywheel_ml::model::{Architecture, ModelConfig};
use flywheel_ml::schema::FeatureSchema;
use flywheel_ml::synthetic::{SyntheticConfig, feature_schema, generate};
use flywheel_ml::train::{
    Convergence, EncodedDataset, MIN_VALIDATION_ROWS, Position, TrainConfig, Trainer,
};
use serde_json::json;

use crate::dataset::{Columns, read_encoded, write_impressions};
use crate::status::{Phase, ProgressReporter};

type CpuBackend = Autodiff<Flex>;

/// The most epochs a job trains by default; early stopping usually ends it sooner.
const DEFAULT_EPOCHS: usize = 100;
const DEFAULT_LEARNING_RATE: f64 = 0.003;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "flywheel-trainer",
    version,
    about = "Flywheel training: data generation and model training"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
struct PsArgs {
    #[arg(long, env = "FLYWHEEL_LISTEN", default_value = "0.0.0.0:7070")]
    listen: std::net::SocketAddr,
    /// This shard's index (0 holds the dense parameters).
    #[arg(long, env = "FLYWHEEL_SHARD", default_value_t = 0)]
    shard: u32,
    #[arg(long, env = "FLYWHEEL_WORKERS", default_value_t = 1)]
    workers: u32,
    #[arg(long, value_parser = parse_architecture, default_value = "deepfm")]
    architecture: Architecture,
    #[arg(long, default_value_t = 16)]
    embedding_dim: usize,
    #[arg(long, default_value = "adagrad")]
    sparse_optimizer: String,
    #[arg(long, default_value_t = 0.05)]
    sparse_learning_rate: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A worker silent this long fails the shard (the gang restarts from its checkpoint).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    worker_timeout: std::time::Duration,
    /// Where the shard writes `ps-shard-<I>.fwt` when the chief asks; an existing one is loaded at start.
    #[arg(long, env = "FLYWHEEL_CHECKPOINT_DIR")]
    checkpoint_dir: Option<PathBuf>,
    /// Start from this artifact's embedding rows (those hashing to this shard), unless a checkpoint exists.
    #[arg(long, env = "FLYWHEEL_WARM_START")]
    warm_start: Option<PathBuf>,
    /// Expected SHA-256 of the warm-start artifact.
    #[arg(long, env = "FLYWHEEL_WARM_START_SHA256")]
    warm_start_sha256: Option<String>,
    /// Shards of the job (which rows of a warm-start artifact are this shard's).
    #[arg(long, env = "FLYWHEEL_SHARDS")]
    shards: Option<u32>,
    /// The gang token (the TrainingJob's Secret) every call must carry; without it calls are not checked.
    #[arg(long, env = "FLYWHEEL_GANG_TOKEN_FILE")]
    gang_token_file: Option<PathBuf>,
}

#[derive(clap::Args)]
// A local rank is started with the launcher's own flags plus overrides (`launcher::local_rank_flags`).
#[command(args_override_self = true)]
struct TrainArgs {
    #[arg(long, env = "FLYWHEEL_TRAIN_DATA")]
    train: PathBuf,
    #[arg(long, env = "FLYWHEEL_EVAL_DATA")]
    eval: PathBuf,
    /// Feature schema JSON (`{"features": [...]}`), as the FeatureView defines it.
    #[arg(long, env = "FLYWHEEL_SCHEMA")]
    schema: PathBuf,
    #[arg(long, default_value = "clicked")]
    label: String,
    /// Column grouping examples for GAUC (e.g. the user).
    #[arg(long, default_value = "user_id")]
    group: String,
    #[arg(long, value_parser = parse_architecture, default_value = "deepfm")]
    architecture: Architecture,
    #[arg(long, default_value_t = 16)]
    embedding_dim: usize,
    /// MLP widths, comma-separated (ignored by logistic).
    #[arg(long, value_delimiter = ',', default_value = "400,400")]
    hidden: Vec<usize>,
    /// Passes over the training set; with early stopping (`--patience`), the most it trains.
    #[arg(long, default_value_t = DEFAULT_EPOCHS)]
    epochs: usize,
    #[arg(long, default_value_t = 1024)]
    batch_size: usize,
    /// Dense (Adam) learning rate.
    #[arg(long, default_value_t = DEFAULT_LEARNING_RATE)]
    learning_rate: f64,
    /// Early stopping: epochs without a lower validation log loss before training stops, keeping the best
    /// epoch's weights; 0 trains every epoch. Not available to parameter-server workers, which train every epoch.
    #[arg(long, default_value_t = 2)]
    patience: usize,
    /// Share of the training set (its last rows: the newest, in a time-ordered set) held out for early stopping
    /// and calibration; 0 holds out nothing (no early stopping, no calibration).
    #[arg(long, default_value_t = 0.1)]
    validation_fraction: f64,
    /// The dense learning rate rises linearly from 0 over these first steps.
    #[arg(long, default_value_t = 0)]
    warmup_steps: u64,
    /// Both learning rates are multiplied by this after an epoch without a lower validation log loss.
    #[arg(long, default_value_t = 0.5)]
    plateau_decay: f64,
    /// L2 penalty on the dense weights.
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    /// Post-training calibration fitted on the validation set and stored in the artifact: platt, isotonic or
    /// none.
    #[arg(long, value_parser = parse_calibration, default_value = "platt")]
    calibration: CalibrationMethod,
    /// Embedding optimizer: adagrad, adam or sgd.
    #[arg(long, default_value = "adagrad")]
    sparse_optimizer: String,
    #[arg(long, default_value_t = 0.05)]
    sparse_learning_rate: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Directory the artifact (`model.fwm`, `model.fwm.sha256`) is written to.
    #[arg(long, env = "FLYWHEEL_OUTPUT")]
    output: PathBuf,
    /// Where the final result is written for the operator.
    #[arg(
        long,
        env = "FLYWHEEL_TERMINATION_LOG",
        default_value = "/dev/termination-log"
    )]
    termination_log: PathBuf,
    /// Report progress every this many steps.
    #[arg(long, default_value_t = 50)]
    progress_every: u64,
    /// Directory of `checkpoint.fwc`; an existing checkpoint there is resumed (a restarted gang continues).
    #[arg(long, env = "FLYWHEEL_CHECKPOINT_DIR")]
    checkpoint_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 1000)]
    checkpoint_every: u64,
    /// Start from this artifact's weights (incremental training).
    #[arg(long, env = "FLYWHEEL_WARM_START")]
    warm_start: Option<PathBuf>,
    /// Expected SHA-256 of the warm-start artifact.
    #[arg(long, env = "FLYWHEEL_WARM_START_SHA256")]
    warm_start_sha256: Option<String>,
    /// Parameter-server shards (`host:port`, comma-separated, in shard order): train as a PS worker.
    #[arg(long, env = "FLYWHEEL_PS_ADDRS", value_delimiter = ',')]
    ps: Vec<String>,
    /// This worker's rank; rank 0 (the chief) writes the artifact.
    #[arg(long, env = "FLYWHEEL_RANK", default_value_t = 0)]
    rank: u32,
    #[arg(long, env = "FLYWHEEL_WORKERS", default_value_t = 1)]
    workers: u32,
    /// Steps between dense-parameter averaging through shard 0.
    #[arg(long, default_value_t = 20)]
    sync_every: u64,
    /// The data-parallel chief (`host:port` of rank 0's collective): train as one rank of a synchronous
    /// data-parallel gang of `--workers`.
    #[arg(long, env = "FLYWHEEL_DP_CHIEF")]
    data_parallel: Option<String>,
    /// Where rank 0 of a data-parallel gang serves the collective.
    #[arg(long, env = "FLYWHEEL_LISTEN", default_value = "0.0.0.0:7070")]
    listen: std::net::SocketAddr,
    /// A data-parallel rank silent this long fails the gang (the operator restarts it from its checkpoint).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    worker_timeout: std::time::Duration,
    /// The gang token (the TrainingJob's Secret): sent with every call to the shards or the chief, and
    /// required of every call to this rank's collective.
    #[arg(long, env = "FLYWHEEL_GANG_TOKEN_FILE")]
    gang_token_file: Option<PathBuf>,
    /// How long to keep trying to reach the shards (or the data-parallel chief) at start.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    connect_timeout: std::time::Duration,
    /// Threads of burn's CPU kernels. Unset (and no `RAYON_NUM_THREADS`): the trainer times a few steps of this
    /// model with 1, 2, 4, … and every core, and trains with the fastest (narrow models train faster on one).
    #[arg(long, env = "FLYWHEEL_CPU_THREADS")]
    cpu_threads: Option<usize>,
    /// Where to train: `cpu` (burn's CPU backend) or `cuda[:N]` (GPU N with burn-cuda; needs a binary
    /// built with `--features cuda`). A data-parallel gang runs one process per GPU, each with its own device.
    #[arg(long, env = "FLYWHEEL_DEVICE", value_parser = parse_device, default_value = "cpu")]
    device: TrainDevice,
    /// Data-parallel ranks this process starts, one per device (a worker given N GPUs trains with N processes):
    /// local rank i is global rank `rank × N + i` of `workers × N`, on `cuda:i` (or the CPU).
    #[arg(long, env = "FLYWHEEL_LOCAL_RANKS", default_value_t = 1)]
    local_ranks: u32,
    /// Where the chief (rank 0) serves its latest progress as JSON at `GET /progress` for the operator to poll
    /// (conventionally 0.0.0.0:7071); other ranks ignore it, and nothing is served when unset.
    #[arg(long, env = "FLYWHEEL_STATUS_LISTEN")]
    status_listen: Option<std::net::SocketAddr>,
}

/// The device a training process computes on.
#[derive(Clone, Copy, Debug, PartialEq)]
enum TrainDevice {
    Cpu,
    Cuda(usize),
}

fn parse_device(text: &str) -> Result<TrainDevice, String> {
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

fn parse_calibration(text: &str) -> Result<CalibrationMethod, String> {
    serde_json::from_value(json!(text))
        .map_err(|_| format!("`{text}`: use platt, isotonic or none"))
}

fn parse_architecture(text: &str) -> Result<Architecture, String> {
    serde_json::from_value(json!(text))
        .map_err(|_| format!("`{text}`: use logistic, wide_deep or deepfm"))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate {
            rows,
            seed,
            users,
            items,
            buckets,
            eval_fraction,
            out,
        } => generate_command(rows, seed, users, items, buckets, eval_fraction, &out),
        Command::Train(args) => train(&args),
        Command::Materialize(args) => featurestore::materialize(&args),
        Command::BuildDataset(args) => featurestore::build_dataset(&args),
        Command::TrainingSet(args) => training_set::build(&args),
        Command::GenerateEvents(args) => featurestore::generate_events(&args),
        Command::Ps(args) => ps_command(&args),
        Command::Movielens { from, out } => movielens::convert(&from, &out).map_err(Into::into).map(
            |(train_rows, eval_rows, click_rate)| {
                emit(json!({"event": "converted", "trainRows": train_rows, "evalRows": eval_rows, "clickRate": click_rate, "out": out}));
            },
        ),
        Command::Encode {
            data,
            schema,
            label,
            group,
            out,
        } => encode_command(&data, &schema, label, group, &out),
        Command::Score {
            model,
            data,
            label,
            out,
        } => score_command(&model, &data, label, &out),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("flywheel-trainer: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn generate_command(
    rows: usize,
    seed: u64,
    users: u32,
    items: u32,
    buckets: u64,
    eval_fraction: f64,
    out: &Path,
) -> anyhow::Result<()> {
    if !(0.0..1.0).contains(&eval_fraction) || rows < 2 {
        bail!("--eval-fraction must be in [0, 1) and --rows at least 2");
    }
    let data = generate(&SyntheticConfig {
        seed,
        users,
        items,
        rows,
        ..SyntheticConfig::default()
    });
    let split = ((rows as f64) * (1.0 - eval_fraction)) as usize;
    write_impressions(&out.join("train.parquet"), &data.impressions[..split])?;
    write_impressions(&out.join("eval.parquet"), &data.impressions[split..])?;
    let schema_path = out.join("schema.json");
    std::fs::write(
        &schema_path,
        serde_json::to_vec_pretty(&feature_schema(buckets))?,
    )
    .with_context(|| format!("writing {}", schema_path.display()))?;
    let eval_probabilities: Vec<f64> = data.impressions[split..]
        .iter()
        .map(|i| i.true_probability)
        .collect();
    let eval_labels: Vec<bool> = data.impressions[split..]
        .iter()
        .map(|i| i.clicked)
        .collect();
    println!(
        "{}",
        json!({
            "event": "generated",
            "trainRows": split,
            "evalRows": rows - split,
            "clickRate": data.click_rate,
            "bayesAuc": data.bayes_auc,
            "evalBayesAuc": flywheel_ml::metrics::auc(&eval_probabilities, &eval_labels),
            "out": out,
        })
    );
    Ok(())
}

fn encode_command(
    data: &Path,
    schema_path: &Path,
    label: String,
    group: String,
    out: &Path,
) -> anyhow::Result<()> {
    let schema = read_schema(schema_path)?;
    let columns = Columns {
        label,
        group: Some(group),
    };
    let encoded = read_encoded(data, &schema, &columns)?;
    dataset::write_encoded(out, &encoded)?;
    emit(
        json!({"event": "encoded", "rows": encoded.len(), "fields": encoded.fields, "numeric": encoded.numeric_width, "out": out}),
    );
    Ok(())
}

fn score_command(model: &Path, data: &Path, label: String, out: &Path) -> anyhow::Result<()> {
    let digest_path = PathBuf::from(format!("{}.sha256", model.display()));
    let digest = std::fs::read_to_string(&digest_path)
        .with_context(|| format!("reading {}", digest_path.display()))?;
    let bytes = artifact::read_file(model, digest.split_whitespace().next())?;
    let saved = artifact::decode::<Flex>(&bytes, &Default::default())?;
    let columns = Columns { label, group: None };
    let encoded = read_encoded(data, &saved.card.schema, &columns)?;
    let scores = flywheel_ml::train::predict(
        &saved.model,
        &saved.tables,
        saved.card.calibrator.as_ref(),
        &encoded,
        &Default::default(),
    );
    std::fs::write(out, serde_json::to_vec(&scores)?)
        .with_context(|| format!("writing {}", out.display()))?;
    emit(json!({"event": "scored", "rows": scores.len(), "out": out}));
    Ok(())
}

/// Trains in the topology the flags choose, reporting progress throughout (and serving the chief's, with
/// `--status-listen`).
fn train(args: &TrainArgs) -> anyhow::Result<()> {
    if !args.ps.is_empty() && args.data_parallel.is_some() {
        bail!("--ps and --data-parallel are two topologies: give one");
    }
    if args.local_ranks != 1 {
        return launch_local_ranks(args);
    }
    // The chief's progress stands for the job's: the other ranks only log theirs.
    let status_listen = args.status_listen.filter(|_| args.rank == 0);
    let mut progress = ProgressReporter::start(args.rank, args.progress_every, status_listen)?;
    match args.device {
        TrainDevice::Cpu => {
            set_cpu_threads(args)?;
            train_on::<CpuBackend>(args, &mut progress, Default::default())?
        }
        TrainDevice::Cuda(index) => train_on_cuda(args, &mut progress, index)?,
    }
    progress.phase(Phase::Done);
    Ok(())
}

/// Sizes rayon's global pool (burn-flex's matmuls run on it): `--cpu-threads`, else `RAYON_NUM_THREADS` as rayon
/// reads it, else the fastest pool for this model as measured.
fn set_cpu_threads(args: &TrainArgs) -> anyhow::Result<()> {
    let threads = match args.cpu_threads {
        Some(0) => bail!("--cpu-threads must be at least 1"),
        Some(threads) => threads,
        None if std::env::var_os("RAYON_NUM_THREADS").is_some() => return Ok(()),
        None => {
            let cores = std::thread::available_parallelism().map_or(1, usize::from);
            let schema = read_schema(&args.schema)?;
            let choice =
                cpu_threads::choose(&model_config(args, &schema), &train_config(args)?, cores)?;
            let measured: serde_json::Map<_, _> = choice
                .step_seconds
                .iter()
                .map(|(threads, seconds)| (threads.to_string(), json!(seconds)))
                .collect();
            emit(
                json!({"event": "cpuThreads", "threads": choice.threads, "stepSeconds": measured}),
            );
            return Ok(());
        }
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .with_context(|| format!("starting {threads} CPU threads"))?;
    emit(json!({"event": "cpuThreads", "threads": threads}));
    Ok(())
}

fn launch_local_ranks(args: &TrainArgs) -> anyhow::Result<()> {
    if args.local_ranks == 0 {
        bail!("--local-ranks must be at least 1");
    }
    if args.data_parallel.is_none() {
        bail!(
            "--local-ranks {} needs --data-parallel: local ranks are members of a data-parallel gang",
            args.local_ranks
        );
    }
    let cuda = matches!(args.device, TrainDevice::Cuda(_));
    let flags = (0..args.local_ranks)
        .map(|local| {
            launcher::local_rank_flags(
                args.rank,
                args.workers,
                args.local_ranks,
                local,
                cuda,
                &args.termination_log,
            )
        })
        .collect();
    launcher::run_local_ranks(flags)
}

fn train_on<B: AutodiffBackend>(
    args: &TrainArgs,
    progress: &mut ProgressReporter,
    device: B::Device,
) -> anyhow::Result<()> {
    if !args.ps.is_empty() {
        ps_worker_command::<B>(args, progress, device)
    } else if args.data_parallel.is_some() {
        data_parallel_command::<B>(args, progress, device)
    } else {
        train_command::<B>(args, progress, device)
    }
}

/// Trains on the GPU `index` with burn-cuda. CUDA is loaded at run time (the driver's `libcuda` and NVRTC), so
/// one binary runs on machines with and without GPUs; a machine without them fails here with burn's reason
/// rather than at the first training step.
#[cfg(feature = "cuda")]
fn train_on_cuda(
    args: &TrainArgs,
    progress: &mut ProgressReporter,
    index: usize,
) -> anyhow::Result<()> {
    use burn::backend::Cuda;
    use burn::backend::cuda::CudaDevice;
    let device = CudaDevice::new(index);
    // burn-cuda panics when the driver cannot be loaded or the device does not exist, on its device thread
    // first: the probe keeps those panics quiet and reports the first one's message.
    let reasons = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let previous_hook = std::panic::take_hook();
    let recorded = reasons.clone();
    std::panic::set_hook(Box::new(move |info| {
        if let Ok(mut reasons) = recorded.lock() {
            let payload = info.payload();
            let reason = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied());
            reasons.push(reason.unwrap_or("unknown reason").to_owned());
        }
    }));
    let probe = std::panic::catch_unwind(|| {
        burn::tensor::Tensor::<Cuda, 1>::from_floats([1.0], &device).into_data()
    });
    std::panic::set_hook(previous_hook);
    if probe.is_err() {
        let reason = reasons
            .lock()
            .ok()
            .and_then(|reasons| reasons.first().cloned())
            .unwrap_or_else(|| "unknown reason".to_owned());
        // cudarc's message goes on to list every library name it tried.
        let reason = reason.split(" - searched").next().unwrap_or(&reason);
        bail!("--device cuda:{index}: the GPU is not usable: {reason}");
    }
    emit(json!({"event": "device", "device": format!("cuda:{index}")}));
    train_on::<Autodiff<Cuda>>(args, progress, device)
}

#[cfg(not(feature = "cuda"))]
fn train_on_cuda(
    _args: &TrainArgs,
    _progress: &mut ProgressReporter,
    index: usize,
) -> anyhow::Result<()> {
    bail!(
        "--device cuda:{index}: this flywheel-trainer was built without CUDA support (build it with `--features cuda`)"
    )
}

fn train_command<B: AutodiffBackend>(
    args: &TrainArgs,
    progress: &mut ProgressReporter,
    device: B::Device,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let Prepared {
        schema,
        columns,
        train,
        validation,
        model,
        config,
    } = prepare(args)?;
    let eval = read_encoded(&args.eval, &schema, &columns)?;
    emit(json!({
        "event": "loaded", "trainRows": train.len(), "evalRows": eval.len(),
        "validationRows": validation.as_ref().map_or(0, |v| v.len()),
        "seconds": started.elapsed().as_secs_f64(),
    }));
    let checkpoint_path = args
        .checkpoint_dir
        .as_ref()
        .map(|dir| dir.join("checkpoint.fwc"));
    let (mut trainer, start, warm_start_digest) = initial_trainer(
        args,
        &schema.hash(),
        (&model, &config),
        train.positive_rate(),
        checkpoint_path.as_deref(),
        device,
    )?;
    let mut card = model_card(
        args,
        schema,
        model,
        config,
        (train.len(), eval.len()),
        warm_start_digest,
    )?;
    card.step = trainer.step;
    let training_started = Instant::now();
    let on_progress = |step: &flywheel_ml::train::Progress| {
        progress.record_step(
            step.epoch,
            step.step,
            step.total_steps,
            args.batch_size,
            step.loss,
        );
    };
    let save = checkpoint_path.as_ref().map(|path| {
        let card = &card;
        (
            args.checkpoint_every,
            move |trainer: &Trainer<B>, position: Position| {
                let bytes = trainer.checkpoint(card, position)?;
                artifact::write_file(path, &bytes)?;
                emit(json!({"event": "checkpoint", "step": trainer.step, "path": path}));
                Ok(())
            },
        )
    });
    let convergence = trainer.fit_from(&train, validation.as_ref(), start, on_progress, save)?;
    let train_seconds = training_started.elapsed().as_secs_f64();
    progress.phase(Phase::Evaluating);
    let samples = train.len() * convergence.epochs_trained.saturating_sub(start.epoch);
    finish_training(&mut card, &mut trainer, validation.as_ref(), convergence);
    card.metrics = trainer.evaluate(&eval);
    publish(args, &card, &trainer, samples, train_seconds, json!({}))
}

/// After the last epoch: calibrates on the validation set and records how training ended in the card.
fn finish_training<B: AutodiffBackend>(
    card: &mut ModelCard,
    trainer: &mut Trainer<B>,
    validation: Option<&EncodedDataset>,
    convergence: Convergence,
) {
    if let Some(validation) = validation {
        trainer.calibrate(card.training.calibration, validation);
    }
    emit(
        json!({"event": "converged", "convergence": convergence, "calibrator": trainer.calibrator}),
    );
    card.calibrator = trainer.calibrator.clone();
    card.convergence = Some(convergence);
    card.step = trainer.step;
}

/// The trainer a run starts from: its checkpoint when one exists (a restarted gang continues), else the
/// warm-start artifact's weights, else a fresh seeded model; with the warm-start artifact's digest.
/// A fresh model starts at the training set's click rate (`positive_rate`).
fn initial_trainer<B: AutodiffBackend>(
    args: &TrainArgs,
    schema_hash: &str,
    (model, config): (&ModelConfig, &TrainConfig),
    positive_rate: f64,
    checkpoint_path: Option<&Path>,
    device: B::Device,
) -> anyhow::Result<(Trainer<B>, Position, Option<String>)> {
    if let Some(path) = checkpoint_path.filter(|path| path.exists()) {
        let (trainer, position) = resume(path, schema_hash, Some(args.rank), device)?;
        return Ok((trainer, position, None));
    }
    let Some(path) = &args.warm_start else {
        let mut trainer = Trainer::<B>::new(model.clone(), config.clone(), device);
        trainer.start_at_base_rate(positive_rate);
        return Ok((trainer, Position::default(), None));
    };
    let bytes = artifact::read_file(path, args.warm_start_sha256.as_deref())?;
    let saved = artifact::decode::<B>(&bytes, &device)
        .with_context(|| format!("warm start from {}", path.display()))?;
    if saved.card.feature_schema_hash != schema_hash {
        bail!(
            "{}: the warm-start model was trained on another feature schema",
            path.display()
        );
    }
    let digest = artifact::sha256_hex(&bytes);
    let trainer = Trainer::warm_start(saved, model, config.clone(), device)?;
    Ok((trainer, Position::default(), Some(digest)))
}

/// One rank of a synchronous data-parallel gang: rank `r` of `W` trains on the `r`-th of `W` equal shares of
/// every global batch, and the gang reduces gradients each step through rank 0's collective, so the result
/// matches one process training with the same global batch. Rank 0 also checkpoints (every rank resumes
/// from its `checkpoint.fwc`), evaluates and writes the artifact.
fn data_parallel_command<B: AutodiffBackend>(
    args: &TrainArgs,
    progress: &mut ProgressReporter,
    device: B::Device,
) -> anyhow::Result<()> {
    let chief = args.data_parallel.as_deref().unwrap_or_default();
    if args.workers == 0 || args.rank >= args.workers {
        bail!(
            "--rank {} is outside 0..{} workers",
            args.rank,
            args.workers
        );
    }
    let started = Instant::now();
    let token = gang_auth::load(args.gang_token_file.as_deref()).context("--gang-token-file")?;
    let prepared = prepare(args)?;
    let checkpoint_path = args
        .checkpoint_dir
        .as_ref()
        .map(|dir| dir.join("checkpoint.fwc"));
    let (mut trainer, start, warm_start_digest) = initial_trainer(
        args,
        &prepared.schema.hash(),
        (&prepared.model, &prepared.config),
        prepared.train.positive_rate(),
        checkpoint_path.as_deref(),
        device,
    )?;
    let (rank, workers) = (args.rank as usize, args.workers as usize);
    let factor_dim = if prepared.model.uses_factors() {
        prepared.model.embedding_dim
    } else {
        0
    };
    let mut chief_side = None;
    let mut reducer = if rank == 0 {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("starting the runtime")?;
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(args.listen))
            .with_context(|| format!("listening on {}", args.listen))?;
        emit(
            json!({"event": "listening", "rank": 0, "addr": listener.local_addr().map(|a| a.to_string()).unwrap_or_default()}),
        );
        let collective = std::sync::Arc::new(collective::Collective::new(
            args.workers,
            trainer.step,
            flywheel_ml::reduce::dense_len(&trainer.model),
            factor_dim,
            args.worker_timeout,
        ));
        let server = collective::spawn_server(&runtime, collective.clone(), listener, token);
        let reducer = collective::Reducer::Chief {
            handle: runtime.handle().clone(),
            collective: collective.clone(),
            step: trainer.step,
        };
        chief_side = Some((runtime, collective, server));
        reducer
    } else {
        collective::Reducer::Peer(Box::new(collective::Peer::connect(
            chief,
            args.rank,
            trainer.step,
            args.connect_timeout,
            args.worker_timeout * 2,
            token.as_ref(),
        )?))
    };
    let mut card = model_card(
        args,
        prepared.schema.clone(),
        prepared.model.clone(),
        prepared.config.clone(),
        (prepared.train.len(), 0),
        warm_start_digest,
    )?;
    emit(json!({
        "event": "loaded", "rank": rank, "trainRows": prepared.train.len(),
        "seconds": started.elapsed().as_secs_f64(),
    }));
    let training_started = Instant::now();
    // Every rank counts the whole global batch, so each reports the gang's throughput.
    let on_progress = |step: &flywheel_ml::train::Progress| {
        progress.record_step(
            step.epoch,
            step.step,
            step.total_steps,
            args.batch_size,
            step.loss,
        );
    };
    let save = checkpoint_path.as_ref().filter(|_| rank == 0).map(|path| {
        let card = &card;
        (
            args.checkpoint_every,
            move |trainer: &Trainer<B>, position: Position| -> anyhow::Result<()> {
                let bytes = trainer.checkpoint(card, position)?;
                artifact::write_file(path, &bytes)?;
                emit(json!({"event": "checkpoint", "step": trainer.step, "path": path}));
                Ok(())
            },
        )
    });
    let train = &prepared.train;
    let validation = prepared.validation.as_ref();
    let convergence = trainer.fit_with(
        train,
        validation,
        start,
        on_progress,
        save,
        |trainer, batch| {
            let share = &batch[batch.len() * rank / workers..batch.len() * (rank + 1) / workers];
            Ok(trainer.train_step_reduced(&mut reducer, train, share)?)
        },
    )?;
    let train_seconds = training_started.elapsed().as_secs_f64();
    let samples = train.len() * convergence.epochs_trained.saturating_sub(start.epoch);
    let Some((runtime, collective, server)) = chief_side else {
        if let collective::Reducer::Peer(peer) = &mut reducer {
            peer.finish()?;
        }
        let result = json!({"event": "done", "rank": rank, "steps": trainer.step, "trainSeconds": train_seconds});
        emit(result.clone());
        write_termination_message(&args.termination_log, &result);
        return Ok(());
    };
    let missing = runtime.block_on(collective.wait_for_peers(args.worker_timeout));
    if !missing.is_empty() {
        emit(
            json!({"event": "warning", "message": format!("rank(s) {missing:?} did not report their end")}),
        );
    }
    server.abort();
    progress.phase(Phase::Evaluating);
    let eval = read_encoded(&args.eval, &prepared.schema, &prepared.columns)?;
    card.lineage.eval_rows = eval.len();
    finish_training(&mut card, &mut trainer, validation, convergence);
    card.metrics = trainer.evaluate(&eval);
    publish(
        args,
        &card,
        &trainer,
        samples,
        train_seconds,
        json!({"workers": workers}),
    )
}

fn sparse_optimizer(kind: &str, learning_rate: f32) -> anyhow::Result<SparseOptimizer> {
    Ok(match kind {
        "adagrad" => SparseOptimizer::adagrad(learning_rate),
        "adam" => SparseOptimizer::adam(learning_rate),
        "sgd" => SparseOptimizer::Sgd { learning_rate },
        other => bail!("--sparse-optimizer `{other}`: use adagrad, adam or sgd"),
    })
}

fn ps_command(args: &PsArgs) -> anyhow::Result<()> {
    if args.workers == 0 {
        bail!("--workers must be at least 1");
    }
    let config = ps::ShardConfig {
        shard: args.shard,
        workers: args.workers,
        embedding_dim: args.embedding_dim,
        factors: args.architecture != Architecture::Logistic,
        optimizer: sparse_optimizer(&args.sparse_optimizer, args.sparse_learning_rate)?,
        init_std: TrainConfig::default().init_std,
        seed: args.seed,
        worker_timeout: args.worker_timeout,
        checkpoint_dir: args.checkpoint_dir.clone(),
        token: gang_auth::load(args.gang_token_file.as_deref()).context("--gang-token-file")?,
    };
    let warm_start = args
        .warm_start
        .as_ref()
        .map(|path| shard_warm_start(args, &config, path))
        .transpose()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let shard = args.shard;
    runtime.block_on(ps::serve(config, warm_start, args.listen, |addr| {
        emit(json!({"event": "listening", "shard": shard, "addr": addr.to_string()}));
    }))?;
    emit(json!({"event": "done", "shard": shard}));
    Ok(())
}

/// This shard's share of the warm-start artifact at `path`: the rows that hash to it, with fresh optimizer state.
fn shard_warm_start(
    args: &PsArgs,
    config: &ps::ShardConfig,
    path: &Path,
) -> anyhow::Result<flywheel_ml::train::Tables> {
    let shards = match args.shards {
        Some(shards) if args.shard < shards => shards as usize,
        _ => bail!(
            "--warm-start needs --shards (FLYWHEEL_SHARDS) above --shard {}: the job's shard count decides which rows are this shard's",
            args.shard
        ),
    };
    let bytes = artifact::read_file(path, args.warm_start_sha256.as_deref())?;
    let saved = artifact::decode::<Flex>(&bytes, &Default::default())
        .with_context(|| format!("warm start from {}", path.display()))?;
    let factors_dim = saved.tables.factors.as_ref().map(|t| t.dim());
    let expected = config.factors.then_some(config.embedding_dim);
    if factors_dim != expected {
        bail!(
            "{}: cannot warm-start this shard: the artifact's factor tables are {factors_dim:?}-dimensional, the job's {expected:?}",
            path.display()
        );
    }
    let mine = |id: u64| flywheel_ml::embedding::shard_of(id, shards) == args.shard as usize;
    let tables = flywheel_ml::train::Tables {
        first_order: saved
            .tables
            .first_order
            .rows_with_optimizer(config.optimizer, mine),
        factors: saved
            .tables
            .factors
            .as_ref()
            .map(|t| t.rows_with_optimizer(config.optimizer, mine)),
    };
    emit(json!({
        "event": "warmStart", "shard": args.shard, "artifact": path,
        "rows": tables.first_order.len(),
    }));
    Ok(tables)
}

/// Trains this worker's share of the data against the parameter-server shards; the chief (rank 0) then waits
/// for the other workers, assembles the model from the shards, evaluates it and writes the artifact.
fn ps_worker_command<B: AutodiffBackend>(
    args: &TrainArgs,
    progress: &mut ProgressReporter,
    device: B::Device,
) -> anyhow::Result<()> {
    if args.workers == 0 || args.rank >= args.workers {
        bail!(
            "--rank {} is outside 0..{} workers",
            args.rank,
            args.workers
        );
    }
    let Prepared {
        schema,
        columns,
        train,
        validation,
        model,
        config,
    } = prepare(args)?;
    let token = gang_auth::load(args.gang_token_file.as_deref()).context("--gang-token-file")?;
    let mut store = worker::RemoteStore::connect(
        &args.ps,
        args.rank,
        args.embedding_dim,
        args.connect_timeout,
        token.as_ref(),
    )?;
    let schema_hash = schema.hash();
    let checkpoint_path = args
        .checkpoint_dir
        .as_ref()
        .map(|dir| dir.join(format!("ps-worker-{}.fwc", args.rank)));
    // A warm start's dense weights start every worker; its rows are the shards'.
    let (mut trainer, start, warm_start_digest) = initial_trainer::<B>(
        args,
        &schema_hash,
        (&model, &config),
        train.positive_rate(),
        checkpoint_path.as_deref(),
        device,
    )?;
    let checkpoint_card = model_card(
        args,
        schema.clone(),
        model.clone(),
        config.clone(),
        (train.len(), 0),
        warm_start_digest.clone(),
    )?;
    let (rank, workers) = (args.rank as usize, args.workers as usize);
    // This worker's steps: every epoch it trains the rows `i mod W == R` (R, R + W, ...) in batches.
    let rows_per_epoch = train.len().saturating_sub(rank).div_ceil(workers);
    let total_steps =
        rows_per_epoch.div_ceil(config.batch_size.max(1)) as u64 * config.epochs as u64;
    let started = Instant::now();
    let mut samples = 0usize;
    for epoch in start.epoch..config.epochs {
        let mine: Vec<usize> = flywheel_ml::train::epoch_order(train.len(), config.seed, epoch)
            .into_iter()
            .filter(|i| i % workers == rank)
            .collect();
        let skip = if epoch == start.epoch { start.batch } else { 0 };
        for (index, batch) in mine.chunks(config.batch_size.max(1)).enumerate().skip(skip) {
            let loss = trainer.train_step_with(&mut store, &train, batch)?;
            samples += batch.len();
            if let Some(path) = &checkpoint_path
                && trainer.step.is_multiple_of(args.checkpoint_every.max(1))
            {
                // The chief has the shards save their rows with its own state.
                if rank == 0 {
                    store.checkpoint(trainer.step)?;
                }
                let bytes = trainer.checkpoint(
                    &checkpoint_card,
                    Position {
                        epoch,
                        batch: index + 1,
                    },
                )?;
                artifact::write_file(path, &bytes)?;
                emit(json!({"event": "checkpoint", "rank": rank, "step": trainer.step}));
            }
            if trainer.step.is_multiple_of(args.sync_every.max(1)) {
                let global =
                    store.sync_dense(flywheel_ml::model::dense_parameters(&trainer.model))?;
                trainer.model = flywheel_ml::model::with_dense_parameters(trainer.model, &global)?;
            }
            progress.record_step(epoch, trainer.step, total_steps, batch.len(), loss);
        }
    }
    store.sync_dense(flywheel_ml::model::dense_parameters(&trainer.model))?;
    let train_seconds = started.elapsed().as_secs_f64();
    if rank != 0 {
        store.done()?;
        emit(
            json!({"event": "done", "rank": rank, "steps": trainer.step, "trainSeconds": train_seconds}),
        );
        return Ok(());
    }
    store.wait_for_workers(args.workers - 1)?;
    progress.phase(Phase::Evaluating);
    let global = store.sync_dense(Vec::new())?;
    trainer.model = flywheel_ml::model::with_dense_parameters(trainer.model, &global)?;
    let epochs_trained = config.epochs;
    let prepared = Prepared {
        schema,
        columns,
        train,
        validation,
        model,
        config,
    };
    let convergence = Convergence {
        epochs_trained,
        ..Convergence::default()
    };
    finish_as_chief(
        args,
        prepared,
        &mut store,
        trainer,
        (samples, train_seconds),
        (warm_start_digest, convergence),
    )
}

/// The job's data, schema and configuration, as every distributed worker loads them.
struct Prepared {
    schema: FeatureSchema,
    columns: Columns,
    train: EncodedDataset,
    /// Held out of `train` for early stopping and calibration.
    validation: Option<EncodedDataset>,
    model: ModelConfig,
    config: TrainConfig,
}

fn read_schema(path: &Path) -> anyhow::Result<FeatureSchema> {
    let schema_text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let schema: FeatureSchema = serde_json::from_str(&schema_text)
        .with_context(|| format!("{}: not a feature schema", path.display()))?;
    schema
        .validate()
        .with_context(|| format!("{}", path.display()))?;
    Ok(schema)
}

fn prepare(args: &TrainArgs) -> anyhow::Result<Prepared> {
    let schema = read_schema(&args.schema)?;
    let columns = Columns {
        label: args.label.clone(),
        group: Some(args.group.clone()),
    };
    let mut train = read_encoded(&args.train, &schema, &columns)?;
    let validation = train.split_validation(args.validation_fraction);
    if validation.is_none() && args.validation_fraction > 0.0 {
        emit(json!({
            "event": "warning",
            "message": format!(
                "no validation set: {} of {} training rows would hold fewer than {MIN_VALIDATION_ROWS} rows or a single class, so there is no early stopping and no calibration",
                args.validation_fraction, train.len()
            ),
        }));
    }
    let model = model_config(args, &schema);
    let config = train_config(args)?;
    Ok(Prepared {
        schema,
        columns,
        train,
        validation,
        model,
        config,
    })
}

fn model_config(args: &TrainArgs, schema: &FeatureSchema) -> ModelConfig {
    ModelConfig {
        architecture: args.architecture,
        embedding_dim: args.embedding_dim,
        hidden_layers: if args.architecture == Architecture::Logistic {
            Vec::new()
        } else {
            args.hidden.clone()
        },
        fields: schema.categorical().len(),
        numeric: schema.numeric().len(),
    }
}

fn train_config(args: &TrainArgs) -> anyhow::Result<TrainConfig> {
    if !(0.0..=0.5).contains(&args.validation_fraction) {
        bail!("--validation-fraction must be in [0, 0.5]");
    }
    if !(args.plateau_decay > 0.0 && args.plateau_decay <= 1.0) {
        bail!("--plateau-decay must be in (0, 1]");
    }
    Ok(TrainConfig {
        epochs: args.epochs,
        batch_size: args.batch_size,
        learning_rate: args.learning_rate,
        sparse_optimizer: sparse_optimizer(&args.sparse_optimizer, args.sparse_learning_rate)?,
        seed: args.seed,
        patience: (args.patience > 0).then_some(args.patience),
        warmup_steps: args.warmup_steps,
        plateau_decay: args.plateau_decay,
        weight_decay: args.weight_decay,
        calibration: args.calibration,
        ..TrainConfig::default()
    })
}

/// The chief's last act once every other worker is done: assemble the embedding rows from the shards, evaluate,
/// write the artifact and the termination message, and release the shards.
fn finish_as_chief<B: AutodiffBackend>(
    args: &TrainArgs,
    prepared: Prepared,
    store: &mut worker::RemoteStore,
    mut trainer: Trainer<B>,
    (samples, train_seconds): (usize, f64),
    (warm_start_digest, convergence): (Option<String>, Convergence),
) -> anyhow::Result<()> {
    let Prepared {
        schema,
        columns,
        train,
        validation,
        model,
        config,
    } = prepared;
    store.export(
        flywheel_ml::train::TableKind::FirstOrder,
        &mut trainer.tables.first_order,
    )?;
    if let Some(factors) = trainer.tables.factors.as_mut() {
        store.export(flywheel_ml::train::TableKind::Factors, factors)?;
    }
    let eval = read_encoded(&args.eval, &schema, &columns)?;
    let mut card = model_card(
        args,
        schema,
        model,
        config,
        (train.len(), eval.len()),
        warm_start_digest,
    )?;
    finish_training(&mut card, &mut trainer, validation.as_ref(), convergence);
    card.metrics = trainer.evaluate(&eval);
    publish(args, &card, &trainer, samples, train_seconds, json!({}))?;
    store.done()?;
    Ok(())
}

/// Writes the chief's artifact and reports the result: a JSON line on stdout and the termination message the
/// operator reads. `extra` fields (e.g. the gang size) join the standard ones.
fn publish<B: AutodiffBackend>(
    args: &TrainArgs,
    card: &ModelCard,
    trainer: &Trainer<B>,
    samples: usize,
    train_seconds: f64,
    extra: serde_json::Value,
) -> anyhow::Result<()> {
    let bytes = artifact::encode(card, &trainer.model, &trainer.tables, false)?;
    let artifact_path = args.output.join("model.fwm");
    let sha256 = artifact::write_file(&artifact_path, &bytes)?;
    let mut result = json!({
        "event": "done",
        "rank": 0,
        "artifact": artifact_path,
        "sha256": sha256,
        "featureSchemaHash": card.feature_schema_hash,
        "metrics": card.metrics,
        "convergence": card.convergence,
        "steps": trainer.step,
        "trainSeconds": train_seconds,
        "samplesPerSecond": samples as f64 / train_seconds.max(1e-9),
    });
    if let (Some(result), serde_json::Value::Object(extra)) = (result.as_object_mut(), extra) {
        result.extend(extra);
    }
    if let (Some(result), Some(view)) = (result.as_object_mut(), &card.lineage.feature_view) {
        result.insert("featureView".into(), json!(view));
    }
    emit(result.clone());
    write_termination_message(&args.termination_log, &result);
    Ok(())
}

/// Restores a trainer from the checkpoint at `path`, refusing one trained on another feature schema, and
/// reports the resumption.
fn resume<B: AutodiffBackend>(
    path: &Path,
    schema_hash: &str,
    rank: Option<u32>,
    device: B::Device,
) -> anyhow::Result<(Trainer<B>, Position)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (trainer, position, card) = Trainer::<B>::resume(&bytes, device)
        .with_context(|| format!("resuming from {}", path.display()))?;
    if card.feature_schema_hash != schema_hash {
        bail!(
            "{}: the checkpoint was trained on another feature schema",
            path.display()
        );
    }
    emit(json!({
        "event": "resumed", "rank": rank, "checkpoint": path, "step": trainer.step,
        "epoch": position.epoch,
    }));
    Ok((trainer, position))
}

/// The model card of this job before training; metrics and step are filled in as training goes.
fn model_card(
    args: &TrainArgs,
    schema: FeatureSchema,
    model: ModelConfig,
    config: TrainConfig,
    rows: (usize, usize),
    warm_start: Option<String>,
) -> anyhow::Result<ModelCard> {
    let feature_view = dataset::feature_view_source(&args.train, &args.eval)?;
    Ok(ModelCard {
        format: FORMAT.to_owned(),
        model,
        feature_schema_hash: schema.hash(),
        schema,
        training: config,
        metrics: Default::default(),
        lineage: Lineage {
            data: vec![
                args.train.display().to_string(),
                args.eval.display().to_string(),
            ],
            train_rows: rows.0,
            eval_rows: rows.1,
            warm_start,
            feature_view,
        },
        code_version: format!("flywheel-trainer/{}", env!("CARGO_PKG_VERSION")),
        step: 0,
        calibrator: None,
        convergence: None,
    })
}

fn emit(event: serde_json::Value) {
    println!("{event}");
}

/// Best effort: outside Kubernetes the default path usually does not exist, and stdout already has the result.
fn write_termination_message(path: &Path, result: &serde_json::Value) {
    if let Err(err) = std::fs::write(path, result.to_string()) {
        eprintln!(
            "flywheel-trainer: not writing the termination message to {}: {err}",
            path.display()
        );
    }
}
