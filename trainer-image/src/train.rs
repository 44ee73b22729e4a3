//! `train`: picks the device and the topology, sizes the CPU pool, or launches local ranks.

use anyhow::{Context, bail};
use burn::tensor::backend::AutodiffBackend;
use serde_json::json;

use crate::CpuBackend;
use crate::cli::*;
use crate::data_parallel::*;
use crate::parameter_server::*;
use crate::report::emit;
use crate::setup::*;
use crate::single::*;
use crate::status::{Phase, ProgressReporter};
use crate::{cpu_threads, launcher};

/// Trains in the topology the flags choose, reporting progress throughout (and serving the chief's, with
/// `--status-listen`).
pub fn train(args: &TrainArgs) -> anyhow::Result<()> {
    if !args.ps.is_empty() && args.data_parallel.is_some() {
        bail!("--ps and --data-parallel are two topologies: give one");
    }
    if args.tune_trials > 0 && (!args.ps.is_empty() || args.data_parallel.is_some()) {
        bail!("--tune-trials searches in one process: not with --ps or --data-parallel");
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
pub fn set_cpu_threads(args: &TrainArgs) -> anyhow::Result<()> {
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

pub fn launch_local_ranks(args: &TrainArgs) -> anyhow::Result<()> {
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

pub fn train_on<B: AutodiffBackend>(
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
pub fn train_on_cuda(
    args: &TrainArgs,
    progress: &mut ProgressReporter,
    index: usize,
) -> anyhow::Result<()> {
    use burn::backend::cuda::CudaDevice;
    use burn::backend::{Autodiff, Cuda};
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
pub fn train_on_cuda(
    _args: &TrainArgs,
    _progress: &mut ProgressReporter,
    index: usize,
) -> anyhow::Result<()> {
    bail!(
        "--device cuda:{index}: this flywheel-trainer was built without CUDA support (build it with `--features cuda`)"
    )
}
