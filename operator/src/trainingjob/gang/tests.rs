//! The gang's pods, Service, NetworkPolicy and paths, with no server.

use k8s_openapi::api::networking::v1::NetworkPolicyIngressRule;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::*;
use crate::plan::examples::load;

fn env_of(pod: &Pod) -> BTreeMap<String, String> {
    pod.spec
        .as_ref()
        .map(|spec| &spec.containers[0])
        .and_then(|c| c.env.clone())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|var| Some((var.name, var.value?)))
        .collect()
}

fn gpu_job() -> TrainingJob {
    let mut job: TrainingJob = load("trainingjob-gpu.yaml", 1);
    job.metadata.namespace = Some("ranking".into());
    job.metadata.uid = Some("uid-1".into());
    job
}

#[test]
fn data_parallel_workers_get_gpus_isolation_and_the_chief_address() {
    let job = gpu_job();
    let quota: flywheel_crds::GPUQuota = load("gpuquota.yaml", 1);
    let paths = paths(&job.name_any(), &job.spec).unwrap_or_else(|e| panic!("{e}"));
    let settings = TrainerSettings::default();
    let gang = GangContext {
        attempt: 2,
        paths: &paths,
        settings: &settings,
        quota: Some(("ranking-team", &quota.spec.isolation)),
        warm_start: None,
    };
    let members = members(&job.spec.topology);
    assert_eq!(members.len(), 2);
    let pod = pod(&job, members[1], &gang);
    let spec = pod.spec.clone().unwrap_or_default();
    let container = &spec.containers[0];
    let limits = container
        .resources
        .as_ref()
        .and_then(|r| r.limits.clone())
        .unwrap_or_default();
    assert_eq!(limits["nvidia.com/gpu"], Quantity("4".into()));
    assert_eq!(
        spec.node_selector.clone().unwrap_or_default()["flywheel.dev/pool"],
        "ranking-gpu"
    );
    assert_eq!(spec.tolerations.as_ref().map(Vec::len), Some(1));
    assert!(
        spec.affinity.is_some(),
        "exclusive nodes need anti-affinity"
    );
    let security = container.security_context.clone().unwrap_or_default();
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    assert_eq!(security.run_as_non_root, Some(true));
    let env = env_of(&pod);
    assert_eq!(env["FLYWHEEL_RANK"], "1");
    assert_eq!(env["FLYWHEEL_WORKERS"], "2");
    assert_eq!(env["FLYWHEEL_DEVICE"], "cuda");
    assert_eq!(
        container.image.as_deref(),
        Some(TrainerSettings::default().gpu_image.as_str()),
        "GPU workers run the CUDA build"
    );
    assert_eq!(env["FLYWHEEL_LOCAL_RANKS"], "4", "one process per GPU");
    assert_eq!(
        env["FLYWHEEL_DP_CHIEF"],
        "worker-0.ctr-widedeep-gpu.ranking.svc:7070"
    );
    assert_eq!(
        env["FLYWHEEL_TRAIN_DATA"],
        "/var/lib/flywheel/datasets/ctr/train.parquet"
    );
    assert_eq!(
        env["FLYWHEEL_SCHEMA"],
        "/var/lib/flywheel/datasets/ctr/schema.json"
    );
    assert_eq!(
        env["FLYWHEEL_OUTPUT"],
        "/var/lib/flywheel/models/ctr-widedeep-gpu"
    );
    assert!(
        !env.contains_key("FLYWHEEL_STATUS_LISTEN"),
        "only the chief serves progress"
    );
    let labels = pod.labels();
    assert_eq!(labels[LABEL_ATTEMPT], "2");
    assert_eq!(labels[LABEL_QUOTA], "ranking-team");
    assert_eq!(pod.name_any(), "ctr-widedeep-gpu-worker-1");
    assert_eq!(spec.subdomain.as_deref(), Some("ctr-widedeep-gpu"));
}

#[test]
fn data_parallel_workers_without_gpus_train_on_cpu_with_the_cpu_image() {
    let mut job = gpu_job();
    job.spec.queue = None;
    if let Topology::DataParallel(dp) = &mut job.spec.topology {
        dp.gpus_per_worker = 0;
        dp.gpu_type = None;
    }
    assert_eq!(job.spec.topology.gpu_demand(), None);
    let paths = paths(&job.name_any(), &job.spec).unwrap_or_else(|e| panic!("{e}"));
    let settings = TrainerSettings::default();
    let gang = GangContext {
        attempt: 0,
        paths: &paths,
        settings: &settings,
        quota: None,
        warm_start: None,
    };
    let members = members(&job.spec.topology);
    assert_eq!(members.len(), 2);
    let pod = pod(&job, members[1], &gang);
    let container = &pod.spec.clone().unwrap_or_default().containers[0];
    let asks_for_gpus = container
        .resources
        .iter()
        .flat_map(|r| r.limits.iter().chain(r.requests.iter()))
        .any(|quantities| quantities.contains_key("nvidia.com/gpu"));
    assert!(!asks_for_gpus, "{:?}", container.resources);
    assert_eq!(container.image.as_deref(), Some(settings.image.as_str()));
    let env = env_of(&pod);
    assert!(
        !env.contains_key("FLYWHEEL_DEVICE"),
        "the trainer's default: cpu"
    );
    assert!(!env.contains_key("FLYWHEEL_LOCAL_RANKS"), "one process");
    assert_eq!(
        env["FLYWHEEL_DP_CHIEF"],
        "worker-0.ctr-widedeep-gpu.ranking.svc:7070"
    );
}

#[test]
fn parameter_server_gang_lists_every_shard_for_the_workers() {
    let mut job = gpu_job();
    job.spec.topology =
        Topology::ParameterServer(flywheel_crds::trainingjob::ParameterServerTopology {
            servers: 2,
            workers: 3,
        });
    let paths = paths(&job.name_any(), &job.spec).unwrap_or_else(|e| panic!("{e}"));
    let settings = TrainerSettings {
        storage_claim: Some("flywheel-data".into()),
        ..TrainerSettings::default()
    };
    let gang = GangContext {
        attempt: 0,
        paths: &paths,
        settings: &settings,
        quota: None,
        warm_start: Some(("file:///m/model.fwm", "ab")),
    };
    let members = members(&job.spec.topology);
    assert_eq!(members.len(), 5);
    let server = pod(&job, members[1], &gang);
    let server_env = env_of(&server);
    assert_eq!(server_env["FLYWHEEL_SHARD"], "1");
    assert_eq!(server_env["FLYWHEEL_SHARDS"], "2");
    assert_eq!(server_env["FLYWHEEL_LISTEN"], "$(POD_IP):7070");
    assert_eq!(
        server_env["FLYWHEEL_WARM_START"], "/m/model.fwm",
        "shards start from the model's rows"
    );
    assert_eq!(
        server
            .spec
            .as_ref()
            .map(|s| s.containers[0].args.clone().unwrap_or_default()[0].clone()),
        Some("ps".to_owned())
    );
    let chief = pod(&job, CHIEF, &gang);
    let env = env_of(&chief);
    assert_eq!(
        env["FLYWHEEL_PS_ADDRS"],
        "ps-0.ctr-widedeep-gpu.ranking.svc:7070,ps-1.ctr-widedeep-gpu.ranking.svc:7070"
    );
    assert_eq!(env["FLYWHEEL_STATUS_LISTEN"], "$(POD_IP):7071");
    assert_eq!(env["FLYWHEEL_WARM_START"], "/m/model.fwm");
    let spec = chief.spec.unwrap_or_default();
    assert!(
        spec.containers[0].resources.is_none(),
        "PS workers ask for no GPUs"
    );
    assert_eq!(spec.containers[0].image, Some(settings.image.clone()));
    assert!(
        spec.volumes
            .clone()
            .unwrap_or_default()
            .iter()
            .any(|v| v.persistent_volume_claim.is_some()),
        "the storage claim is mounted"
    );
    // Every member holds the gang token: shards and the chief accept only calls that carry it.
    for member in [&server.spec.clone().unwrap_or_default(), &spec] {
        let gang_secret = member
            .volumes
            .iter()
            .flatten()
            .find_map(|v| v.secret.as_ref()?.secret_name.clone());
        assert_eq!(
            gang_secret.as_deref(),
            Some("ctr-widedeep-gpu-gang-credentials")
        );
    }
    for env in [&server_env, &env] {
        assert_eq!(
            env["FLYWHEEL_GANG_TOKEN_FILE"],
            "/var/run/flywheel/credentials/gang-token"
        );
    }
}

#[test]
fn only_file_uris_resolve() {
    let mut job = gpu_job();
    if let Some(dataset) = &mut job.spec.data.dataset {
        dataset.train = "s3://bucket/train.parquet".into();
    }
    let error = paths("j", &job.spec).err().unwrap_or_default();
    assert!(error.starts_with("spec.data.dataset.train:"), "{error}");
    let mut feature_view: TrainingJob = load("trainingjob-ps.yaml", 1);
    if let Some(view) = &mut feature_view.spec.data.feature_view {
        view.events = "gs://bucket/impressions/".into();
    }
    let error = paths("j", &feature_view.spec).err().unwrap_or_default();
    assert!(
        error.starts_with("spec.data.featureView.events:"),
        "{error}"
    );
}

#[test]
fn checkpoints_default_under_the_artifact_directory() {
    let job = gpu_job();
    let paths = paths("j", &job.spec).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(paths.checkpoints, "/var/lib/flywheel/models/j/checkpoints");
}

#[test]
fn the_service_is_headless_and_publishes_unready_members() {
    let job = gpu_job();
    let service = service(&job);
    let spec = service.spec.unwrap_or_default();
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
    assert_eq!(spec.publish_not_ready_addresses, Some(true));
    assert_eq!(
        service.metadata.owner_references.unwrap_or_default()[0].uid,
        "uid-1"
    );
}

#[test]
fn only_gang_members_reach_the_rpc_port_and_anyone_the_progress_port() {
    let job = gpu_job();
    let policy = network_policy(&job);
    let name = job.name_any();
    assert_eq!(
        policy.metadata.name,
        Some(network_policy_name(&name)),
        "one policy per job"
    );
    let spec = policy.spec.unwrap_or_default();
    let members = Some(selector_labels(&name));
    assert_eq!(spec.pod_selector.and_then(|s| s.match_labels), members);
    assert_eq!(spec.policy_types, Some(vec!["Ingress".to_owned()]));
    let rules = spec.ingress.unwrap_or_default();
    let port_of =
        |rule: &NetworkPolicyIngressRule| rule.ports.clone().unwrap_or_default()[0].port.clone();
    let rpc = rules
        .iter()
        .find(|r| port_of(r) == Some(IntOrString::Int(i32::from(RPC_PORT))))
        .unwrap_or_else(|| panic!("no rule for the RPC port: {rules:?}"));
    let from = rpc.from.clone().unwrap_or_default();
    assert_eq!(from.len(), 1);
    assert_eq!(
        from[0].pod_selector.clone().and_then(|s| s.match_labels),
        members
    );
    assert!(from[0].namespace_selector.is_none(), "this namespace only");
    let status = rules
        .iter()
        .find(|r| port_of(r) == Some(IntOrString::Int(i32::from(STATUS_PORT))))
        .unwrap_or_else(|| panic!("no rule for the progress port: {rules:?}"));
    assert!(status.from.is_none());
    assert_eq!(rules.len(), 2, "no other port is open");
}
