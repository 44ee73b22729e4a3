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
    Affinity, Capabilities, Container, ContainerPort, KeyToPath, PersistentVolumeClaimVolumeSource,
    Pod, PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec, ResourceRequirements,
    SeccompProfile, SecretVolumeSource, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta, OwnerReference,
};
use kube::{Resource, ResourceExt};

pub use crate::config::TrainerSettings;
pub use network::{network_policy, network_policy_name, service};
pub use paths::{Paths, TRAFFIC_LABEL, dataset_dir, local_path, paths};

use contract::{member_env, model_args, worker_args};

mod contract;
mod network;
mod paths;

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
