//! `flywheel-trainer`: the command line over the `flywheel_trainer` library (see its documentation).

use clap::Parser;
use serde_json::json;

use flywheel_trainer::cli::{Cli, Command};
use flywheel_trainer::data_commands::{encode_command, generate_command, score_command};
use flywheel_trainer::parameter_server::ps_command;
use flywheel_trainer::report::emit;
use flywheel_trainer::train::train;
use flywheel_trainer::{featurestore, movielens, traffic_log, traffic_set, training_set};

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
