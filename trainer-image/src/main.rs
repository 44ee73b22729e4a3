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

mod cli;
mod collective;
mod cpu_threads;
mod data_commands;
mod data_parallel;
mod dataset;
mod featurestore;
mod gang_auth;
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod huge_pages;
mod launcher;
mod movielens;
mod online_writer;
mod parameter_server;
mod ps;
mod publish;
mod report;
mod setup;
mod single;
mod status;
mod traffic_log;
mod traffic_set;
mod train;
mod training_set;
mod tuning;
mod worker;

use burn::backend::{Autodiff, Flex};
use clap::Parser;
use serde_json::json;

use crate::cli::{Cli, Command};
use crate::data_commands::{encode_command, generate_command, score_command};
use crate::parameter_server::ps_command;
use crate::report::emit;
use crate::train::train;

type CpuBackend = Autodiff<Flex>;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        Command::TrafficTrainingSet(args) => traffic_set::build(&args),
        Command::LogTraffic(args) => traffic_log::log_traffic(&args),
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
