//! The trainer's contract: the arguments and environment each gang member starts with (see
//! trainer-image/README.md).

use flywheel_auth::{CREDENTIALS_DIR, GANG_TOKEN_KEY};
use flywheel_crds::TrainingJob;
use flywheel_crds::trainingjob::{Topology, TrainingJobSpec};
use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource, ObjectFieldSelector};
use kube::ResourceExt;

use super::{
    CHIEF, GangContext, Member, Paths, RPC_PORT, Role, STATUS_PORT, TERMINATION_LOG, has_gang_rpc,
    trains_on_cuda,
};

fn address(job: &TrainingJob, member: Member, port: u16) -> String {
    format!(
        "{}.{}.{}.svc:{port}",
        member.hostname(),
        job.name_any(),
        job.namespace().unwrap_or_default()
    )
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn field_env(name: &str, field: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field.to_owned(),
                api_version: None,
            }),
            ..EnvVarSource::default()
        }),
    }
}

fn optimizer_name(spec: &TrainingJobSpec) -> &'static str {
    match spec.optimizer.kind {
        flywheel_crds::trainingjob::OptimizerKind::Adam => "adam",
        flywheel_crds::trainingjob::OptimizerKind::Adagrad => "adagrad",
        flywheel_crds::trainingjob::OptimizerKind::Sgd => "sgd",
    }
}

fn sparse_learning_rate(spec: &TrainingJobSpec) -> f64 {
    spec.optimizer
        .sparse_learning_rate
        .unwrap_or(spec.optimizer.learning_rate)
}

/// Arguments both roles share: the model and its sparse optimizer must agree across the gang.
pub(super) fn model_args(spec: &TrainingJobSpec) -> Vec<String> {
    vec![
        "--architecture".into(),
        spec.model.architecture.as_str().into(),
        "--embedding-dim".into(),
        spec.model.embedding_dim.to_string(),
        "--sparse-optimizer".into(),
        optimizer_name(spec).into(),
        "--sparse-learning-rate".into(),
        sparse_learning_rate(spec).to_string(),
        "--seed".into(),
        spec.seed.to_string(),
    ]
}

pub(super) fn worker_args(spec: &TrainingJobSpec, paths: &Paths) -> Vec<String> {
    let mut args = vec!["train".to_owned()];
    args.extend(model_args(spec));
    args.extend([
        "--label".into(),
        paths.label.clone(),
        "--epochs".into(),
        spec.epochs.to_string(),
        "--batch-size".into(),
        spec.batch_size.to_string(),
        "--learning-rate".into(),
        spec.optimizer.learning_rate.to_string(),
        "--weight-decay".into(),
        spec.optimizer.weight_decay.to_string(),
        "--warmup-steps".into(),
        spec.optimizer.warmup_steps.to_string(),
        "--patience".into(),
        spec.early_stopping.patience.to_string(),
        "--validation-fraction".into(),
        spec.early_stopping.validation_fraction.to_string(),
        "--calibration".into(),
        spec.calibration.as_str().into(),
        "--checkpoint-every".into(),
        spec.checkpoint
            .as_ref()
            .map_or(1000, |c| c.every_steps)
            .to_string(),
    ]);
    if !spec.model.hidden_layers.is_empty() {
        let widths: Vec<String> = spec
            .model
            .hidden_layers
            .iter()
            .map(u32::to_string)
            .collect();
        args.extend(["--hidden".into(), widths.join(",")]);
    }
    // The spec's space is the trainer's `--tune-space` JSON as it is.
    if let Some(tuning) = &spec.tuning {
        args.extend([
            "--tune-trials".into(),
            tuning.trials.to_string(),
            "--tune-space".into(),
            serde_json::to_string(&tuning.space).unwrap_or_else(|_| "{}".to_owned()),
        ]);
    }
    args
}

pub(super) fn member_env(job: &TrainingJob, member: Member, gang: &GangContext<'_>) -> Vec<EnvVar> {
    let spec = &job.spec;
    let paths = gang.paths;
    let mut vars = vec![
        field_env("POD_IP", "status.podIP"),
        env("FLYWHEEL_CHECKPOINT_DIR", &paths.checkpoints),
        env("FLYWHEEL_TERMINATION_LOG", TERMINATION_LOG),
    ];
    let workers = match &spec.topology {
        Topology::Single(_) => 1,
        Topology::ParameterServer(ps) => ps.workers,
        Topology::DataParallel(dp) => dp.workers,
    };
    vars.push(env("FLYWHEEL_WORKERS", workers.to_string()));
    match member.role {
        Role::Server => {
            vars.push(env("FLYWHEEL_SHARD", member.index.to_string()));
            if let Topology::ParameterServer(ps) = &spec.topology {
                vars.push(env("FLYWHEEL_SHARDS", ps.servers.to_string()));
            }
            vars.push(env("FLYWHEEL_LISTEN", format!("$(POD_IP):{RPC_PORT}")));
        }
        Role::Worker => {
            vars.extend([
                env("FLYWHEEL_TRAIN_DATA", &paths.train),
                env("FLYWHEEL_EVAL_DATA", &paths.eval),
                env("FLYWHEEL_SCHEMA", &paths.schema),
                env("FLYWHEEL_OUTPUT", &paths.output),
                env("FLYWHEEL_RANK", member.index.to_string()),
            ]);
            match &spec.topology {
                Topology::ParameterServer(ps) => {
                    let shards: Vec<String> = (0..ps.servers)
                        .map(|index| {
                            let server = Member {
                                role: Role::Server,
                                index,
                            };
                            address(job, server, RPC_PORT)
                        })
                        .collect();
                    vars.push(env("FLYWHEEL_PS_ADDRS", shards.join(",")));
                }
                Topology::DataParallel(dp) => {
                    vars.push(env("FLYWHEEL_DP_CHIEF", address(job, CHIEF, RPC_PORT)));
                    vars.push(env("FLYWHEEL_LISTEN", format!("$(POD_IP):{RPC_PORT}")));
                    // One training process per GPU: the worker starts `gpusPerWorker` local ranks, the
                    // i-th on the pod's GPU (or MIG slice) i, as the device plugin numbers them.
                    if trains_on_cuda(&spec.topology) {
                        vars.push(env("FLYWHEEL_DEVICE", "cuda"));
                        vars.push(env("FLYWHEEL_LOCAL_RANKS", dp.gpus_per_worker.to_string()));
                    }
                }
                Topology::Single(_) => {}
            }
            if member.is_chief() {
                vars.push(env(
                    "FLYWHEEL_STATUS_LISTEN",
                    format!("$(POD_IP):{STATUS_PORT}"),
                ));
            }
        }
    }
    if has_gang_rpc(&spec.topology) {
        vars.push(env(
            "FLYWHEEL_GANG_TOKEN_FILE",
            format!("{CREDENTIALS_DIR}/{GANG_TOKEN_KEY}"),
        ));
    }
    // Workers start their dense weights from it, parameter-server shards their rows.
    if let Some((uri, sha256)) = gang.warm_start {
        vars.push(env(
            "FLYWHEEL_WARM_START",
            uri.strip_prefix("file://").unwrap_or(uri),
        ));
        vars.push(env("FLYWHEEL_WARM_START_SHA256", sha256));
    }
    vars
}
