//! `flywheel-trainer`: the batch data plane a TrainingJob's pods run, also usable on a laptop. The binary is
//! a thin `main` over this library, so every command's logic is unit-testable.
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

pub mod cli;
pub mod collective;
pub mod cpu_threads;
pub mod data_commands;
pub mod data_parallel;
pub mod dataset;
pub mod featurestore;
pub mod gang_auth;
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub mod huge_pages;
pub mod launcher;
pub mod movielens;
pub mod online_writer;
pub mod parameter_server;
pub mod ps;
pub mod publish;
pub mod report;
pub mod setup;
pub mod single;
pub mod status;
pub mod traffic_log;
pub mod traffic_set;
pub mod train;
pub mod training_set;
pub mod tuning;
pub mod worker;

use burn::backend::{Autodiff, Flex};

/// The CPU training backend (burn's Flex with autodiff).
pub type CpuBackend = Autodiff<Flex>;
