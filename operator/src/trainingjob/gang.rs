//! The pods, headless Service and NetworkPolicy of a TrainingJob's gang, as pure functions of the job, its
//! attempt and its quota's isolation: the trainer's env/args contract (see trainer-image/README.md) lives here.
//!
//! Every member reaches the others by DNS (`<role>-<index>.<job>.<namespace>.svc`) through the headless
//! Service, which publishes members before they are ready so a gang can start in any order.

use std::collections::BTreeMap;

use flywheel_auth::{CREDENTIALS_DIR, GANG_TOKEN_KEY};
use flywheel_crds::TrainingJob;
use flywheel_crds::gpuquota::Isolation;
use flywheel_crds::trainingjob::{Topology, TrainingJobSpec};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, KeyToPath,
    ObjectFieldSelector, PersistentVolumeClaimVolumeSource, Pod, PodAffinityTerm, PodAntiAffinity,
    PodSecurityContext, PodSpec, ResourceRequirements, SeccompProfile, SecretVolumeSource,
    SecurityContext, Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta, OwnerReference,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};

pub use crate::config::TrainerSettings;

/// Port of the parameter-server shards and of the data-parallel chief's collective.
pub const RPC_PORT: u16 = 7070;
/// Port where the chief worker serves its progress (`GET /progress`).
pub const STATUS_PORT: u16 = 7071;
pub const CONTAINER: &str = "trainer";
const TERMINATION_LOG: &str = "/dev/termination-log";
/// Where the trainer writes scratch files: the root filesystem is read-only.
pub const SCRATCH: &str = "/tmp";

pub const LABEL_JOB: &str = "flywheel.dev/training-job";
pub const LABEL_ROLE: &str = "flywheel.dev/role";
pub const LABEL_INDEX: &str = "flywheel.dev/index";
pub const LABEL_ATTEMPT: &str = "flywheel.dev/attempt";
pub const LABEL_QUOTA: &str = "flywheel.dev/quota";
/// Kueue's queue label, passed through to every pod so a cluster running Kueue can own admission.
pub const KUEUE_QUEUE_LABEL: &str = "kueue.x-k8s.io/queue-name";
/// Node label the NVIDIA GPU feature discovery sets to the GPU product.
const GPU_PRODUCT_LABEL: &str = "nvidia.com/gpu.product";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Worker,
    Server,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Server => "server",
        }
    }

    fn host_prefix(self) -> &'static str {
        match self {
            Role::Worker => "worker",
            Role::Server => "ps",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "worker" => Some(Role::Worker),
            "server" => Some(Role::Server),
            _ => None,
        }
    }
}

/// One member of the gang.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Member {
    pub role: Role,
    pub index: u32,
}

impl Member {
    pub fn hostname(self) -> String {
        format!("{}-{}", self.role.host_prefix(), self.index)
    }

    pub fn pod_name(self, job: &str) -> String {
        format!("{job}-{}", self.hostname())
    }

    pub fn is_chief(self) -> bool {
        self == CHIEF
    }
}

/// Rank 0: writes the checkpoint and the artifact, serves progress, reports the result.
pub const CHIEF: Member = Member {
    role: Role::Worker,
    index: 0,
};

/// Every member of the topology, servers first.
pub fn members(topology: &Topology) -> Vec<Member> {
    let (servers, workers) = match topology {
        Topology::Single(_) => (0, 1),
        Topology::ParameterServer(ps) => (ps.servers, ps.workers),
        Topology::DataParallel(dp) => (0, dp.workers),
    };
    let server = (0..servers).map(|index| Member {
        role: Role::Server,
        index,
    });
    let worker = (0..workers).map(|index| Member {
        role: Role::Worker,
        index,
    });
    server.chain(worker).collect()
}

/// Local paths of the job's data, schema, artifact and checkpoints, from its `file://` URIs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub train: String,
    pub eval: String,
    pub label: String,
    pub schema: String,
    pub output: String,
    pub checkpoints: String,
}

/// The label column of a training set built from served traffic (`flywheel-trainer traffic-training-set`).
pub const TRAFFIC_LABEL: &str = "clicked";

/// Resolves the job's storage URIs, or says which field the trainer cannot read.
pub fn paths(job_name: &str, spec: &TrainingJobSpec) -> Result<Paths, String> {
    let output = join(
        &local_path("spec.output.artifactUri", &spec.output.artifact_uri)?,
        job_name,
    );
    let built_label = match (&spec.data.feature_view, &spec.data.served_traffic) {
        (Some(view), _) => {
            local_path("spec.data.featureView.events", &view.events)?;
            Some(view.label.clone())
        }
        (None, Some(_)) => Some(TRAFFIC_LABEL.to_owned()),
        (None, None) => None,
    };
    let (train, eval, label, schema) = match (&spec.data.dataset, built_label) {
        (Some(dataset), _) => {
            let train = local_path("spec.data.dataset.train", &dataset.train)?;
            let eval = local_path("spec.data.dataset.eval", &dataset.eval)?;
            let schema = match &dataset.schema {
                Some(uri) => local_path("spec.data.dataset.schema", uri)?,
                None => sibling(&train, "schema.json"),
            };
            (train, eval, dataset.label.clone(), schema)
        }
        // The training-set step writes the sets and their schema beside the job's model.
        (None, Some(label)) => {
            let dir = dataset_dir(&output);
            (
                join(&dir, "train.parquet"),
                join(&dir, "eval.parquet"),
                label,
                join(&dir, "schema.json"),
            )
        }
        (None, None) => {
            return Err("spec.data: set featureView, servedTraffic or dataset".to_owned());
        }
    };
    let checkpoints = match &spec.checkpoint {
        Some(checkpoint) => join(
            &local_path("spec.checkpoint.uri", &checkpoint.uri)?,
            job_name,
        ),
        None => join(&output, "checkpoints"),
    };
    Ok(Paths {
        train,
        eval,
        label,
        schema,
        output,
        checkpoints,
    })
}

/// Where a job's training-set step writes `train.parquet`, `eval.parquet` and `schema.json`.
pub fn dataset_dir(output: &str) -> String {
    join(output, "dataset")
}

pub fn local_path(field: &str, uri: &str) -> Result<String, String> {
    match uri.strip_prefix("file://") {
        Some(path) if path.starts_with('/') => Ok(path.to_owned()),
        Some(_) => Err(format!("{field}: `{uri}` must be an absolute file:///path")),
        None => Err(format!(
            "{field}: the trainer reads file:// URIs (a volume shared by the gang); `{uri}` is not one"
        )),
    }
}

fn join(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.trim_end_matches('/'))
}

fn sibling(path: &str, name: &str) -> String {
    let trimmed = path.trim_end_matches('/');
    match trimmed.rsplit_once('/') {
        Some((dir, _)) if !dir.is_empty() => join(dir, name),
        _ => join("", name),
    }
}

/// Everything a pod needs besides the job.
pub struct GangContext<'a> {
    pub attempt: u32,
    pub paths: &'a Paths,
    pub settings: &'a TrainerSettings,
    /// The quota the job is admitted under, and its isolation (injected; users cannot opt out).
    pub quota: Option<(&'a str, &'a Isolation)>,
    /// Artifact URI and sha256 of the ModelVersion to warm-start from.
    pub warm_start: Option<(&'a str, &'a str)>,
}

pub fn owner_reference(job: &TrainingJob) -> OwnerReference {
    OwnerReference {
        api_version: TrainingJob::api_version(&()).into_owned(),
        kind: TrainingJob::kind(&()).into_owned(),
        name: job.name_any(),
        uid: job.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Labels every object of the gang carries.
pub fn selector_labels(job: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(LABEL_JOB.to_owned(), job.to_owned())])
}

/// The headless Service that gives gang members their DNS names.
pub fn service(job: &TrainingJob) -> Service {
    let name = job.name_any();
    Service {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: job.namespace(),
            labels: Some(selector_labels(&name)),
            owner_references: Some(vec![owner_reference(job)]),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            selector: Some(selector_labels(&name)),
            publish_not_ready_addresses: Some(true),
            ports: Some(vec![
                ServicePort {
                    name: Some("rpc".to_owned()),
                    port: i32::from(RPC_PORT),
                    // Server-side apply keys ports by (port, protocol); 1.20 has no default for it.
                    protocol: Some("TCP".to_owned()),
                    ..ServicePort::default()
                },
                ServicePort {
                    name: Some("status".to_owned()),
                    port: i32::from(STATUS_PORT),
                    protocol: Some("TCP".to_owned()),
                    ..ServicePort::default()
                },
            ]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Name of the gang's NetworkPolicy.
pub fn network_policy_name(job: &str) -> String {
    format!("{job}-gang")
}

/// Who may reach the gang's pods: the shards' and the chief's RPC port only from members of the same gang
/// (parameters and gradients never come from outside it; the gang token authenticates on top), the progress
/// port from anywhere (the operator polls it; it only reads). Enforced where the cluster's network plugin
/// enforces NetworkPolicies.
pub fn network_policy(job: &TrainingJob) -> NetworkPolicy {
    let name = job.name_any();
    let tcp = |port: u16| NetworkPolicyPort {
        port: Some(IntOrString::Int(i32::from(port))),
        protocol: Some("TCP".to_owned()),
        ..NetworkPolicyPort::default()
    };
    let members = LabelSelector {
        match_labels: Some(selector_labels(&name)),
        ..LabelSelector::default()
    };
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(network_policy_name(&name)),
            namespace: job.namespace(),
            labels: Some(selector_labels(&name)),
            owner_references: Some(vec![owner_reference(job)]),
            ..ObjectMeta::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(members.clone()),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        pod_selector: Some(members),
                        ..NetworkPolicyPeer::default()
                    }]),
                    ports: Some(vec![tcp(RPC_PORT)]),
                },
                NetworkPolicyIngressRule {
                    from: None,
                    ports: Some(vec![tcp(STATUS_PORT)]),
                },
            ]),
            ..NetworkPolicySpec::default()
        }),
    }
}

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
fn model_args(spec: &TrainingJobSpec) -> Vec<String> {
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

fn worker_args(spec: &TrainingJobSpec, paths: &Paths) -> Vec<String> {
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

fn member_env(job: &TrainingJob, member: Member, gang: &GangContext<'_>) -> Vec<EnvVar> {
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

/// The Secret holding the gang token of a job whose members call each other (parameter server, data
/// parallel): shards and the chief accept only calls that carry it.
pub fn credentials_name(job: &str) -> String {
    format!("{job}-gang-credentials")
}

/// Whether the job's members talk to each other over gRPC (and so need the gang token).
pub fn has_gang_rpc(topology: &Topology) -> bool {
    !matches!(topology, Topology::Single(_))
}

/// Whether the job's workers train with burn-cuda: a data-parallel gang on NVIDIA GPUs or MIG slices.
fn trains_on_cuda(topology: &Topology) -> bool {
    matches!(topology, Topology::DataParallel(dp)
        if dp.gpus_per_worker > 0 && dp.gpu_resource.starts_with("nvidia.com/"))
}

fn resources(spec: &TrainingJobSpec, role: Role) -> Option<ResourceRequirements> {
    let base = spec.resources.as_ref().and_then(|r| match role {
        Role::Worker => r.worker.clone(),
        Role::Server => r.server.clone(),
    });
    let (Role::Worker, Topology::DataParallel(dp)) = (role, &spec.topology) else {
        return base;
    };
    if dp.gpus_per_worker == 0 {
        return base;
    }
    // GPUs are extended resources: requests must equal limits, and the gang's quota is counted from them.
    let mut requirements = base.unwrap_or_default();
    let gpus = Quantity(dp.gpus_per_worker.to_string());
    requirements
        .limits
        .get_or_insert_with(BTreeMap::new)
        .insert(dp.gpu_resource.clone(), gpus.clone());
    requirements
        .requests
        .get_or_insert_with(BTreeMap::new)
        .insert(dp.gpu_resource.clone(), gpus);
    Some(requirements)
}

fn security_context() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        read_only_root_filesystem: Some(true),
        allow_privilege_escalation: Some(false),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            add: None,
        }),
        ..SecurityContext::default()
    }
}

fn pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        // The image's `nonroot` user; checked by the kubelet against runAsNonRoot.
        run_as_user: Some(65532),
        run_as_group: Some(65532),
        fs_group: Some(65532),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            localhost_profile: None,
        }),
        ..PodSecurityContext::default()
    }
}

pub fn volumes(settings: &TrainerSettings) -> (Vec<Volume>, Vec<VolumeMount>) {
    let mut volumes = vec![Volume {
        name: "scratch".to_owned(),
        empty_dir: Some(Default::default()),
        ..Volume::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "scratch".to_owned(),
        mount_path: SCRATCH.to_owned(),
        ..VolumeMount::default()
    }];
    if let Some(claim) = &settings.storage_claim {
        volumes.push(Volume {
            name: "storage".to_owned(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: Some(false),
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "storage".to_owned(),
            mount_path: settings.storage_path.clone(),
            ..VolumeMount::default()
        });
    }
    (volumes, mounts)
}

/// Keeps pods of other quotas off the nodes this quota's pods run on (and, by the symmetry of required
/// anti-affinity, this quota's pods off theirs).
fn exclusive_anti_affinity(quota: &str) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            required_during_scheduling_ignored_during_execution: Some(vec![PodAffinityTerm {
                topology_key: "kubernetes.io/hostname".to_owned(),
                label_selector: Some(LabelSelector {
                    match_expressions: Some(vec![
                        LabelSelectorRequirement {
                            key: LABEL_QUOTA.to_owned(),
                            operator: "Exists".to_owned(),
                            values: None,
                        },
                        LabelSelectorRequirement {
                            key: LABEL_QUOTA.to_owned(),
                            operator: "NotIn".to_owned(),
                            values: Some(vec![quota.to_owned()]),
                        },
                    ]),
                    match_labels: None,
                }),
                namespace_selector: Some(LabelSelector::default()),
                ..PodAffinityTerm::default()
            }]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    }
}

/// The pod of one gang member.
pub fn pod(job: &TrainingJob, member: Member, gang: &GangContext<'_>) -> Pod {
    let spec = &job.spec;
    let name = job.name_any();
    let mut labels = selector_labels(&name);
    labels.insert(LABEL_ROLE.to_owned(), member.role.as_str().to_owned());
    labels.insert(LABEL_INDEX.to_owned(), member.index.to_string());
    labels.insert(LABEL_ATTEMPT.to_owned(), gang.attempt.to_string());
    labels.insert(
        "app.kubernetes.io/name".to_owned(),
        "flywheel-trainer".to_owned(),
    );
    labels.insert(
        "app.kubernetes.io/managed-by".to_owned(),
        "flywheel-operator".to_owned(),
    );
    if let Some(queue) = job.labels().get(KUEUE_QUEUE_LABEL) {
        labels.insert(KUEUE_QUEUE_LABEL.to_owned(), queue.clone());
    }
    let mut node_selector = BTreeMap::new();
    if let Topology::DataParallel(dp) = &spec.topology
        && let Some(product) = &dp.gpu_type
    {
        node_selector.insert(GPU_PRODUCT_LABEL.to_owned(), product.clone());
    }
    let mut tolerations = Vec::new();
    let mut runtime_class_name = None;
    let mut affinity = None;
    if let Some((quota, isolation)) = gang.quota {
        labels.insert(LABEL_QUOTA.to_owned(), quota.to_owned());
        // The quota's placement wins over the job's: a user cannot move their pods off the team's nodes.
        node_selector.extend(isolation.node_selector.clone());
        tolerations.extend(isolation.tolerations.iter().cloned());
        runtime_class_name = isolation.runtime_class_name.clone();
        if isolation.exclusive_nodes {
            affinity = Some(exclusive_anti_affinity(quota));
        }
    }
    let args = match member.role {
        Role::Worker => worker_args(spec, gang.paths),
        Role::Server => {
            let mut args = vec!["ps".to_owned()];
            args.extend(model_args(spec));
            args
        }
    };
    let (mut volumes, mut mounts) = volumes(gang.settings);
    if has_gang_rpc(&spec.topology) {
        volumes.push(Volume {
            name: "credentials".to_owned(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(credentials_name(&name)),
                items: Some(vec![KeyToPath {
                    key: GANG_TOKEN_KEY.to_owned(),
                    path: GANG_TOKEN_KEY.to_owned(),
                    mode: None,
                }]),
                ..SecretVolumeSource::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "credentials".to_owned(),
            mount_path: CREDENTIALS_DIR.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    let mut ports = vec![ContainerPort {
        name: Some("rpc".to_owned()),
        container_port: i32::from(RPC_PORT),
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }];
    if member.is_chief() {
        ports.push(ContainerPort {
            name: Some("status".to_owned()),
            container_port: i32::from(STATUS_PORT),
            protocol: Some("TCP".to_owned()),
            ..ContainerPort::default()
        });
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(member.pod_name(&name)),
            namespace: job.namespace(),
            labels: Some(labels),
            owner_references: Some(vec![owner_reference(job)]),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            hostname: Some(member.hostname()),
            subdomain: Some(name.clone()),
            restart_policy: Some("Never".to_owned()),
            service_account_name: gang.settings.service_account.clone(),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            security_context: Some(pod_security_context()),
            node_selector: (!node_selector.is_empty()).then_some(node_selector),
            tolerations: (!tolerations.is_empty()).then_some(tolerations),
            runtime_class_name,
            affinity,
            volumes: Some(volumes),
            containers: vec![Container {
                name: CONTAINER.to_owned(),
                image: Some(spec.image.clone().unwrap_or_else(|| {
                    if trains_on_cuda(&spec.topology) {
                        gang.settings.gpu_image.clone()
                    } else {
                        gang.settings.image.clone()
                    }
                })),
                args: Some(args),
                env: Some(member_env(job, member, gang)),
                ports: Some(ports),
                resources: resources(spec, member.role),
                security_context: Some(security_context()),
                volume_mounts: Some(mounts),
                termination_message_path: Some(TERMINATION_LOG.to_owned()),
                termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests;
