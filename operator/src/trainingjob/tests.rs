//! Plan tests: every phase transition of a TrainingJob, without a server.

use flywheel_crds::common::Duration;
use flywheel_crds::gpuquota::{GPUQuotaStatus, JobRef};
use flywheel_crds::trainingjob::{
    DatasetUris, EventRange, ServedTrafficData, TrainingData, TrainingJobStatus, TrainingPhase,
};
use flywheel_crds::{FeatureView, GPUQuota, TrainingJob};
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus, Pod,
    PodCondition, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::dataset::{DatasetInput, DatasetObservation};
use super::gang::{self, LABEL_ATTEMPT, Paths, TrainerSettings};
use super::plan::{Observed, TrainingPlan, WarmStart, chief_result, plan};
use crate::batch_job::Outcome;
use crate::plan::examples::{condition, load};

const RESULT: &str = r#"{"event":"done","rank":0,"artifact":"/data/models/ps-job/model.fwm","sha256":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","featureSchemaHash":"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","metrics":{"auc":0.71,"gauc":0.65,"logLoss":0.5,"calibration":1.01,"samples":2000},"steps":120,"trainSeconds":3.0,"samplesPerSecond":40000.0}"#;

/// The PS example, on a ready-made dataset (what the trainer reads today).
fn ps_job() -> TrainingJob {
    let mut job: TrainingJob = load("trainingjob-ps.yaml", 1);
    job.metadata.name = Some("ps-job".into());
    job.metadata.namespace = Some("team".into());
    job.metadata.uid = Some("uid-ps".into());
    job.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        Timestamp::UNIX_EPOCH,
    ));
    job.spec.data = TrainingData {
        feature_view: None,
        served_traffic: None,
        dataset: Some(DatasetUris {
            train: "file:///data/ctr/train.parquet".into(),
            eval: "file:///data/ctr/eval.parquet".into(),
            label: "clicked".into(),
            schema: None,
        }),
    };
    job.spec.output.artifact_uri = "file:///data/models/".into();
    job
}

fn gpu_job(name: &str) -> TrainingJob {
    let mut job: TrainingJob = load("trainingjob-gpu.yaml", 1);
    job.metadata.name = Some(name.into());
    job.metadata.namespace = Some("default".into());
    job.metadata.uid = Some(format!("uid-{name}"));
    job.metadata.creation_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        Timestamp::UNIX_EPOCH,
    ));
    job
}

fn with_status(mut job: TrainingJob, status: TrainingJobStatus) -> TrainingJob {
    job.status = Some(status);
    job
}

fn observe<'a>(
    job: &'a TrainingJob,
    pods: &'a [Pod],
    quota: Option<&'a GPUQuota>,
    settings: &'a TrainerSettings,
) -> TrainingPlan {
    observe_dataset(job, pods, quota, settings, DatasetObservation::NotNeeded)
}

fn observe_dataset<'a>(
    job: &'a TrainingJob,
    pods: &'a [Pod],
    quota: Option<&'a GPUQuota>,
    settings: &'a TrainerSettings,
    dataset: DatasetObservation,
) -> TrainingPlan {
    plan(&Observed {
        job,
        pods: pods.iter().collect(),
        quota,
        warm_start: WarmStart::NotRequested,
        progress: None,
        settings,
        dataset,
        now: Timestamp::from_second(100).unwrap_or(Timestamp::UNIX_EPOCH),
    })
}

/// The pod's trainer container waiting to start, for `reason` (as the kubelet reports it).
fn wait_to_start(pod: &mut Pod, reason: &str, message: &str) {
    if let Some(status) = pod.status.as_mut() {
        status.container_statuses = Some(vec![ContainerStatus {
            name: gang::CONTAINER.into(),
            state: Some(ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.into()),
                    message: Some(message.into()),
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        }]);
    }
}

/// The gang's pods as the operator made them for `attempt`, each in `phase`.
fn gang_pods(job: &TrainingJob, attempt: u32, phase: &str) -> Vec<Pod> {
    let paths: Paths = gang::paths(&job.name_any(), &job.spec).unwrap_or_else(|e| panic!("{e}"));
    let settings = TrainerSettings::default();
    let context = gang::GangContext {
        attempt,
        paths: &paths,
        settings: &settings,
        quota: None,
        warm_start: None,
    };
    gang::members(&job.spec.topology)
        .into_iter()
        .map(|member| {
            let mut pod = gang::pod(job, member, &context);
            pod.status = Some(PodStatus {
                phase: Some(phase.into()),
                ..PodStatus::default()
            });
            pod
        })
        .collect()
}

fn terminate(pod: &mut Pod, phase: &str, exit_code: i32, message: &str) {
    pod.status = Some(PodStatus {
        phase: Some(phase.into()),
        container_statuses: Some(vec![ContainerStatus {
            name: gang::CONTAINER.into(),
            state: Some(ContainerState {
                terminated: Some(ContainerStateTerminated {
                    exit_code,
                    message: Some(message.into()),
                    ..ContainerStateTerminated::default()
                }),
                ..ContainerState::default()
            }),
            ..ContainerStatus::default()
        }]),
        ..PodStatus::default()
    });
}

fn quota_admitting(admitted: &[&TrainingJob], queued: &[(&TrainingJob, &str)]) -> GPUQuota {
    let mut quota: GPUQuota = load("gpuquota.yaml", 1);
    let reference = |job: &TrainingJob, reason: Option<&str>| JobRef {
        namespace: job.namespace().unwrap_or_default(),
        name: job.name_any(),
        uid: job.uid(),
        reason: reason.map(str::to_owned),
    };
    quota.status = Some(GPUQuotaStatus {
        admitted: admitted.iter().map(|job| reference(job, None)).collect(),
        queued: queued
            .iter()
            .map(|(job, reason)| reference(job, Some(reason)))
            .collect(),
        ..GPUQuotaStatus::default()
    });
    quota
}

#[test]
fn topology_summary_and_validation_are_reported() {
    let settings = TrainerSettings::default();
    let job = ps_job();
    let decided = observe(&job, &[], None, &settings);
    assert_eq!(decided.plan.status.topology.as_deref(), Some("ps 2x4"));
    let mut invalid = gpu_job("gpu");
    invalid.spec.queue = None;
    invalid.metadata.generation = Some(2);
    let decided = observe(&invalid, &[], None, &settings);
    let (status, message, generation) = condition(&decided.plan.status.conditions, "InvalidSpec");
    assert_eq!((status, generation), ("True", Some(2)));
    assert!(message.contains("spec.queue"), "{message}");
    assert!(
        decided.create_pods.is_empty(),
        "an invalid job runs nothing"
    );
}

#[test]
fn evaluation_before_training_end_is_invalid() {
    let mut job: TrainingJob = load("trainingjob-ps.yaml", 1);
    if let Some(view) = &mut job.spec.data.feature_view {
        view.eval_range.start = view.train_range.start.clone();
        view.eval_range.end = view.train_range.end.clone();
    }
    let settings = TrainerSettings::default();
    let decided = observe(&job, &[], None, &settings);
    let (_, message, _) = condition(&decided.plan.status.conditions, "InvalidSpec");
    assert!(
        message.contains("spec.data.featureView.evalRange.start"),
        "{message}"
    );
}

#[test]
fn a_cpu_job_without_a_queue_starts_its_whole_gang_at_once() {
    let settings = TrainerSettings::default();
    let job = ps_job();
    let decided = observe(&job, &[], None, &settings);
    assert_eq!(decided.plan.status.phase, Some(TrainingPhase::Running));
    let names: Vec<String> = decided.create_pods.iter().map(|p| p.name_any()).collect();
    assert_eq!(
        names,
        [
            "ps-job-ps-0",
            "ps-job-ps-1",
            "ps-job-worker-0",
            "ps-job-worker-1",
            "ps-job-worker-2",
            "ps-job-worker-3"
        ]
    );
    assert!(decided.service.is_some());
    assert_eq!(
        condition(&decided.plan.status.conditions, "Ready").0,
        "False",
        "Ready waits for the ModelVersion"
    );
    assert!(decided.plan.requeue.is_some(), "progress is polled");
}

#[test]
fn a_gpu_job_waits_in_its_quota_queue_with_reason_and_position() {
    let settings = TrainerSettings::default();
    let first = gpu_job("first");
    let second = gpu_job("second");
    let quota = quota_admitting(
        &[&first],
        &[(&second, "waiting for 8 nvidia.com/gpu: 8 of 8 in use")],
    );
    let decided = observe(&second, &[], Some(&quota), &settings);
    assert_eq!(decided.plan.status.phase, Some(TrainingPhase::Queued));
    let queue = decided
        .plan
        .status
        .queue
        .clone()
        .unwrap_or_else(|| panic!("no queue status"));
    assert_eq!(queue.position, Some(1));
    assert_eq!(queue.reason, "waiting for 8 nvidia.com/gpu: 8 of 8 in use");
    assert!(decided.create_pods.is_empty());
    let admitted = observe(&first, &[], Some(&quota), &settings);
    assert_eq!(admitted.create_pods.len(), 2);
    assert_eq!(admitted.admitted_after.map(|d| d.as_secs()), Some(100));
    let isolated = admitted.create_pods[0].spec.clone().unwrap_or_default();
    assert_eq!(
        isolated.node_selector.unwrap_or_default()["flywheel.dev/pool"],
        "ranking-gpu",
        "the quota's isolation is injected"
    );
}

#[test]
fn an_admitted_gang_the_scheduler_cannot_place_says_so() {
    let settings = TrainerSettings::default();
    let job = gpu_job("first");
    let quota = quota_admitting(&[&job], &[]);
    let mut pods = gang_pods(&job, 1, "Pending");
    let job = with_status(
        job,
        TrainingJobStatus {
            phase: Some(TrainingPhase::Running),
            attempt: 1,
            ..TrainingJobStatus::default()
        },
    );
    if let Some(status) = pods[0].status.as_mut() {
        status.conditions = Some(vec![PodCondition {
            type_: "PodScheduled".into(),
            status: "False".into(),
            reason: Some("Unschedulable".into()),
            message: Some("0/3 nodes are available: 3 Insufficient nvidia.com/gpu.".into()),
            ..PodCondition::default()
        }]);
    }
    let stuck = observe(&job, &pods, Some(&quota), &settings);
    let (status, message, _) = condition(&stuck.plan.status.conditions, "PodsScheduled");
    assert_eq!(status, "False");
    assert!(
        message.contains("1 of 2 pods cannot be scheduled")
            && message.contains("Insufficient nvidia.com/gpu"),
        "{message}"
    );
    assert!(
        stuck
            .plan
            .events
            .iter()
            .any(|e| e.reason == "Unschedulable" && e.warning)
    );
    let again = observe(
        &with_status(job.clone(), stuck.plan.status.clone()),
        &pods,
        Some(&quota),
        &settings,
    );
    assert!(
        again
            .plan
            .events
            .iter()
            .all(|e| e.reason != "Unschedulable"),
        "the Warning is raised once"
    );
    let placed = observe(
        &job,
        &gang_pods(&job, 1, "Running"),
        Some(&quota),
        &settings,
    );
    assert_eq!(
        condition(&placed.plan.status.conditions, "PodsScheduled").0,
        "True"
    );
}

#[test]
fn a_gang_whose_image_cannot_be_pulled_names_the_pod_and_the_reason() {
    let settings = TrainerSettings::default();
    let job = with_status(
        ps_job(),
        TrainingJobStatus {
            phase: Some(TrainingPhase::Running),
            attempt: 1,
            ..TrainingJobStatus::default()
        },
    );
    let mut pods = gang_pods(&job, 1, "Pending");
    let stuck_pod = pods[0].name_any();
    wait_to_start(
        &mut pods[0],
        "ErrImagePull",
        "pull access denied for example/missing",
    );
    let stuck = observe(&job, &pods, None, &settings);
    let (status, message, _) = condition(&stuck.plan.status.conditions, "PodsStarted");
    assert_eq!(status, "False");
    let reason =
        flywheel_crds::common::find_condition(&stuck.plan.status.conditions, "PodsStarted")
            .map(|c| c.reason.as_str());
    assert_eq!(reason, Some("ErrImagePull"));
    assert!(
        message.contains(&stuck_pod) && message.contains("pull access denied"),
        "{message}"
    );
    assert!(
        stuck
            .plan
            .events
            .iter()
            .any(|e| e.reason == "ErrImagePull" && e.warning)
    );
    let again = observe(
        &with_status(job.clone(), stuck.plan.status.clone()),
        &pods,
        None,
        &settings,
    );
    assert!(
        again.plan.events.iter().all(|e| e.reason != "ErrImagePull"),
        "the Warning is raised once"
    );
    let started = observe(
        &with_status(job.clone(), stuck.plan.status.clone()),
        &gang_pods(&job, 1, "Running"),
        None,
        &settings,
    );
    assert_eq!(
        condition(&started.plan.status.conditions, "PodsStarted").0,
        "True"
    );
}

#[test]
fn a_gang_stuck_starting_past_its_start_timeout_fails_and_gives_its_pods_back() {
    let settings = TrainerSettings::default();
    let mut job = ps_job();
    job.spec.start_timeout = Some("30s".into());
    let job = with_status(
        job,
        TrainingJobStatus {
            phase: Some(TrainingPhase::Running),
            attempt: 1,
            ..TrainingJobStatus::default()
        },
    );
    let mut pods = gang_pods(&job, 1, "Pending");
    wait_to_start(
        &mut pods[0],
        "CreateContainerConfigError",
        "secret \"hf-token\" not found",
    );
    let stuck = observe(&job, &pods, None, &settings);
    assert_eq!(stuck.plan.status.phase, Some(TrainingPhase::Running));
    // The same state 30 s after it began (the plan's clock is at 100 s).
    let mut status = stuck.plan.status.clone();
    for condition in &mut status.conditions {
        if condition.type_ == "PodsStarted" {
            condition.last_transition_time =
                Time(Timestamp::from_second(70).unwrap_or(Timestamp::UNIX_EPOCH));
        }
    }
    let gave_up = observe(&with_status(job.clone(), status), &pods, None, &settings);
    assert_eq!(gave_up.plan.status.phase, Some(TrainingPhase::Failed));
    let (failed, message, _) = condition(&gave_up.plan.status.conditions, "Failed");
    assert_eq!(failed, "True");
    assert!(
        message.contains("CreateContainerConfigError")
            && message.contains("hf-token")
            && message.contains("spec.startTimeout (30s)"),
        "{message}"
    );
    assert_eq!(
        gave_up.delete_pods.len(),
        pods.len(),
        "every pod goes, so the quota is free"
    );
    assert!(gave_up.create_pods.is_empty());
}

#[test]
fn a_missing_quota_keeps_the_job_queued() {
    let settings = TrainerSettings::default();
    let job = gpu_job("lonely");
    let decided = observe(&job, &[], None, &settings);
    assert_eq!(decided.plan.status.phase, Some(TrainingPhase::Queued));
    assert_eq!(
        condition(&decided.plan.status.conditions, "Admitted").1,
        "GPUQuota `ranking-team` does not exist"
    );
}

#[test]
fn success_registers_a_model_version_and_removes_the_parameter_servers() {
    let settings = TrainerSettings::default();
    let job = with_status(
        ps_job(),
        TrainingJobStatus {
            phase: Some(TrainingPhase::Running),
            ..TrainingJobStatus::default()
        },
    );
    let mut pods = gang_pods(&job, 0, "Running");
    for pod in pods.iter_mut().filter(|p| p.name_any().contains("worker")) {
        let message = if pod.name_any().ends_with("worker-0") {
            RESULT
        } else {
            "{\"event\":\"done\",\"rank\":1}"
        };
        terminate(pod, "Succeeded", 0, message);
    }
    let decided = observe(&job, &pods, None, &settings);
    let status = &decided.plan.status;
    assert_eq!(status.phase, Some(TrainingPhase::Succeeded));
    assert_eq!(status.model_version.as_deref(), Some("ps-job"));
    assert_eq!(status.metrics.as_ref().and_then(|m| m.auc), Some(0.71));
    assert_eq!(condition(&status.conditions, "Ready").0, "True");
    assert_eq!(decided.delete_pods, ["ps-job-ps-0", "ps-job-ps-1"]);
    let version = decided
        .model_version
        .unwrap_or_else(|| panic!("no ModelVersion"));
    assert!(
        version.metadata.owner_references.is_none(),
        "a registry entry outlives its job"
    );
    assert_eq!(
        version.spec.artifact.uri,
        "file:///data/models/ps-job/model.fwm"
    );
    assert_eq!(version.spec.metrics.eval_samples, Some(2000));
    assert_eq!(version.spec.lineage.training_job.as_deref(), Some("ps-job"));
    assert_eq!(version.spec.model_name, "ctr");
    assert_eq!(
        version.spec.validation, job.spec.validation,
        "the version is judged by the job's gates"
    );
    assert_eq!(version.spec.validation.gates.len(), 2);

    // The next reconcile finds the job finished: only lingering servers are removed.
    let done = with_status(job.clone(), decided.plan.status.clone());
    let again = observe(&done, &pods, None, &settings);
    assert!(again.model_version.is_none());
    assert!(again.create_pods.is_empty());
    assert_eq!(again.delete_pods, ["ps-job-ps-0", "ps-job-ps-1"]);
}

#[test]
fn the_model_version_records_the_feature_view_its_training_set_came_from() {
    let job = with_status(
        ps_job(),
        TrainingJobStatus {
            phase: Some(TrainingPhase::Running),
            ..TrainingJobStatus::default()
        },
    );
    let hash = "c".repeat(64);
    let result = RESULT.replacen(
        "\"steps\"",
        &format!("\"featureView\":{{\"name\":\"ml/acts\",\"schemaHash\":\"{hash}\"}},\"steps\""),
        1,
    );
    let mut pods = gang_pods(&job, 0, "Running");
    for pod in pods.iter_mut().filter(|p| p.name_any().contains("worker")) {
        let chief = pod.name_any().ends_with("worker-0");
        terminate(pod, "Succeeded", 0, if chief { &result } else { "{}" });
    }
    let decided = observe(&job, &pods, None, &TrainerSettings::default());
    let lineage = decided
        .model_version
        .map(|version| version.spec.lineage)
        .unwrap_or_default();
    assert_eq!(lineage.feature_view.as_deref(), Some("ml/acts"));
    assert_eq!(lineage.feature_view_schema_hash, Some(hash));
}

fn traffic_job() -> TrainingJob {
    let mut job = ps_job();
    job.spec.data = TrainingData {
        feature_view: None,
        served_traffic: Some(ServedTrafficData {
            rollout: "ctr".into(),
            click_window: None,
            train_range: EventRange {
                start: None,
                end: None,
                last: Some(Duration::from("7d")),
            },
            eval_range: EventRange {
                start: None,
                end: None,
                last: Some(Duration::from("1d")),
            },
        }),
        dataset: None,
    };
    job
}

#[test]
fn a_job_on_served_traffic_waits_until_the_rollout_logs_it() {
    let settings = TrainerSettings::default();
    let job = traffic_job();
    let missing = DatasetObservation::Missing {
        reason: "TrafficNotLogged".into(),
        message: "Rollout `ctr` logs no traffic: set its spec.feedback.trafficLog".into(),
    };
    let decided = observe_dataset(&job, &[], None, &settings, missing);
    let status = &decided.plan.status;
    assert_eq!(status.phase, Some(TrainingPhase::Queued));
    let built = flywheel_crds::common::find_condition(&status.conditions, "DatasetBuilt")
        .unwrap_or_else(|| panic!("no DatasetBuilt condition"));
    assert_eq!(
        (built.status.as_str(), built.reason.as_str()),
        ("False", "TrafficNotLogged")
    );
    assert!(
        built.message.contains("spec.feedback.trafficLog"),
        "{}",
        built.message
    );
    assert!(decided.dataset_job.is_none() && decided.create_pods.is_empty());
}

#[test]
fn the_model_version_of_a_job_on_served_traffic_names_the_rollout_and_the_range() {
    let job = with_status(
        traffic_job(),
        TrainingJobStatus {
            phase: Some(TrainingPhase::Running),
            ..TrainingJobStatus::default()
        },
    );
    let mut pods = gang_pods(&job, 0, "Running");
    for pod in pods.iter_mut().filter(|p| p.name_any().contains("worker")) {
        let chief = pod.name_any().ends_with("worker-0");
        terminate(pod, "Succeeded", 0, if chief { RESULT } else { "{}" });
    }
    let decided = observe(&job, &pods, None, &TrainerSettings::default());
    let lineage = decided
        .model_version
        .map(|version| version.spec.lineage)
        .unwrap_or_default();
    assert_eq!(lineage.served_traffic.as_deref(), Some("ctr"));
    let range = lineage
        .data_range
        .unwrap_or_else(|| panic!("no data range"));
    assert_eq!(
        range.end.0.as_second() - range.start.0.as_second(),
        7 * 86_400,
        "the last 7 days before the evaluation day"
    );
}

#[test]
fn the_trials_of_a_tuned_job_are_in_its_status_and_the_best_is_named() {
    let job = with_status(
        ps_job(),
        TrainingJobStatus {
            phase: Some(TrainingPhase::Running),
            ..TrainingJobStatus::default()
        },
    );
    let result = RESULT.replacen(
        "\"steps\"",
        r#""tuning":{"best":1,"trials":[[0,0.003,0.05,0,16,[400,400],0.4711,9],[1,0.0012,0.08,1e-5,32,[64],0.4652,14]]},"steps""#,
        1,
    );
    let mut pods = gang_pods(&job, 0, "Running");
    for pod in pods.iter_mut().filter(|p| p.name_any().contains("worker")) {
        let chief = pod.name_any().ends_with("worker-0");
        terminate(pod, "Succeeded", 0, if chief { &result } else { "{}" });
    }
    let decided = observe(&job, &pods, None, &TrainerSettings::default());
    let tuning = decided
        .plan
        .status
        .tuning
        .clone()
        .unwrap_or_else(|| panic!("no tuning status"));
    assert_eq!(tuning.best_trial, 1);
    assert_eq!(tuning.trials.len(), 2);
    assert_eq!(tuning.trials[1].hidden_layers, [64]);
    assert_eq!(tuning.trials[1].validation_log_loss, 0.4652);
    assert!(
        decided
            .plan
            .events
            .iter()
            .any(|e| e.reason == "Tuned" && e.note.starts_with("trial 1 of 2 kept")),
        "{:?}",
        decided.plan.events
    );
}

#[test]
fn a_failed_member_restarts_the_whole_gang_as_a_new_attempt() {
    let settings = TrainerSettings::default();
    let job = with_status(
        ps_job(),
        TrainingJobStatus {
            phase: Some(TrainingPhase::Running),
            ..TrainingJobStatus::default()
        },
    );
    let mut pods = gang_pods(&job, 0, "Running");
    if let Some(pod) = pods.iter_mut().find(|p| p.name_any() == "ps-job-worker-1") {
        terminate(pod, "Failed", 137, "training\nkilled by signal 9");
    }
    let decided = observe(&job, &pods, None, &settings);
    let status = &decided.plan.status;
    assert_eq!(status.phase, Some(TrainingPhase::Restarting));
    assert_eq!((status.restarts, status.attempt), (1, 1));
    assert_eq!(
        status.restart_reasons,
        ["ps-job-worker-1 exited 137: killed by signal 9"]
    );
    assert_eq!(decided.delete_pods.len(), 6, "the whole gang goes");
    assert!(decided.restarted);

    // Old pods still terminating: nothing new starts yet.
    let restarting = with_status(job.clone(), status.clone());
    let waiting = observe(&restarting, &pods, None, &settings);
    assert!(waiting.create_pods.is_empty());
    // Old pods gone: the next attempt starts.
    let resumed = observe(&restarting, &[], None, &settings);
    assert_eq!(resumed.create_pods.len(), 6);
    assert!(
        resumed
            .create_pods
            .iter()
            .all(|p| p.labels()[LABEL_ATTEMPT] == "1")
    );
    assert_eq!(resumed.plan.status.phase, Some(TrainingPhase::Running));
}

#[test]
fn exceeding_the_backoff_limit_fails_with_the_reason() {
    let settings = TrainerSettings::default();
    let mut job = ps_job();
    job.spec.backoff_limit = 1;
    let job = with_status(
        job,
        TrainingJobStatus {
            phase: Some(TrainingPhase::Running),
            restarts: 1,
            attempt: 1,
            ..TrainingJobStatus::default()
        },
    );
    let mut pods = gang_pods(&job, 1, "Running");
    if let Some(pod) = pods.iter_mut().find(|p| p.name_any() == "ps-job-worker-0") {
        terminate(
            pod,
            "Failed",
            1,
            "flywheel-trainer: reading /data/ctr/train.parquet: No such file",
        );
    }
    let decided = observe(&job, &pods, None, &settings);
    let status = &decided.plan.status;
    assert_eq!(status.phase, Some(TrainingPhase::Failed));
    let (_, message, _) = condition(&status.conditions, "Failed");
    assert_eq!(
        message,
        "backoffLimit (1) reached: ps-job-worker-0 exited 1: flywheel-trainer: reading /data/ctr/train.parquet: No such file"
    );
    assert_eq!(condition(&status.conditions, "Ready").1, message);
    assert_eq!(
        decided.delete_pods.len(),
        5,
        "live pods go, the failed one stays for its logs"
    );
    assert!(status.completion_time.is_some());
}

#[test]
fn a_chief_without_a_result_is_a_failure() {
    let settings = TrainerSettings::default();
    let mut job = ps_job();
    job.spec.topology =
        flywheel_crds::trainingjob::Topology::Single(flywheel_crds::trainingjob::SingleTopology {});
    let job = with_status(job, TrainingJobStatus::default());
    let mut pods = gang_pods(&job, 0, "Running");
    terminate(&mut pods[0], "Succeeded", 0, "");
    let decided = observe(&job, &pods, None, &settings);
    assert_eq!(decided.plan.status.phase, Some(TrainingPhase::Restarting));
    assert!(
        decided.plan.status.restart_reasons[0].starts_with("the chief finished without a result"),
        "{:?}",
        decided.plan.status.restart_reasons
    );
}

#[test]
fn preemption_takes_the_gang_down_without_counting_a_restart() {
    let settings = TrainerSettings::default();
    let job = with_status(
        gpu_job("victim"),
        TrainingJobStatus {
            phase: Some(TrainingPhase::Running),
            ..TrainingJobStatus::default()
        },
    );
    let vip = gpu_job("vip");
    let quota = quota_admitting(
        &[&vip],
        &[(&job, "preempted by default/vip (priority 100)")],
    );
    let pods = gang_pods(&job, 0, "Running");
    let decided = observe(&job, &pods, Some(&quota), &settings);
    let status = &decided.plan.status;
    assert_eq!(status.phase, Some(TrainingPhase::Queued));
    assert_eq!((status.restarts, status.attempt), (0, 1));
    assert_eq!(decided.delete_pods.len(), 2);
    assert!(decided.plan.events.iter().any(|e| e.reason == "Evicted"));
}

#[test]
fn suspension_removes_the_pods_and_resumption_starts_a_new_attempt() {
    let settings = TrainerSettings::default();
    let mut job = with_status(
        ps_job(),
        TrainingJobStatus {
            phase: Some(TrainingPhase::Running),
            ..TrainingJobStatus::default()
        },
    );
    job.spec.suspend = true;
    let pods = gang_pods(&job, 0, "Running");
    let decided = observe(&job, &pods, None, &settings);
    assert_eq!(decided.plan.status.phase, Some(TrainingPhase::Suspended));
    assert_eq!(decided.delete_pods.len(), 6);
    let mut resumed = with_status(job.clone(), decided.plan.status.clone());
    resumed.spec.suspend = false;
    let decided = observe(&resumed, &[], None, &settings);
    assert_eq!(decided.create_pods.len(), 6);
    assert_eq!(decided.create_pods[0].labels()[LABEL_ATTEMPT], "1");
}

/// Anyone can add a Kueue queue label: it must not take a GPU job out of its team's quota.
#[test]
fn a_kueue_label_does_not_bypass_the_gpu_quota_and_is_kept() {
    let settings = TrainerSettings::default();
    let mut job = gpu_job("kueued");
    job.labels_mut()
        .insert(gang::KUEUE_QUEUE_LABEL.into(), "team-queue".into());
    let missing = observe(&job, &[], None, &settings);
    assert!(missing.create_pods.is_empty(), "no quota, no pods");
    assert_eq!(missing.plan.status.phase, Some(TrainingPhase::Queued));
    let full = quota_admitting(&[], &[(&job, "the quota is full")]);
    let queued = observe(&job, &[], Some(&full), &settings);
    assert!(
        queued.create_pods.is_empty(),
        "queued by the quota, no pods"
    );
    let admitting = quota_admitting(&[&job], &[]);
    let decided = observe(&job, &[], Some(&admitting), &settings);
    assert_eq!(decided.create_pods.len(), 2);
    assert_eq!(
        decided.create_pods[0].labels()[gang::KUEUE_QUEUE_LABEL],
        "team-queue"
    );
    let (status, message, _) = condition(&decided.plan.status.conditions, "Admitted");
    assert_eq!(status, "True");
    assert!(message.contains("does not bypass"), "{message}");
}

/// The PS example as shipped: it reads the FeatureView `ctr-events`.
fn view_job() -> TrainingJob {
    let mut job: TrainingJob = load("trainingjob-ps.yaml", 1);
    job.metadata.namespace = Some("team".into());
    job.metadata.uid = Some("uid-view".into());
    job
}

fn view() -> DatasetInput {
    let mut view: FeatureView = load("featureview.yaml", 1);
    view.metadata.namespace = Some("team".into());
    DatasetInput::View(Box::new(view))
}

#[test]
fn a_job_on_a_feature_view_builds_its_training_set_before_admission() {
    let settings = TrainerSettings::default();
    let job = view_job();
    let decided = observe_dataset(
        &job,
        &[],
        None,
        &settings,
        DatasetObservation::Found {
            input: view(),
            job: None,
        },
    );
    let status = &decided.plan.status;
    assert_eq!(status.phase, Some(TrainingPhase::Queued));
    assert!(
        decided.create_pods.is_empty(),
        "no gang while data is built"
    );
    assert_eq!(
        decided
            .dataset_job
            .as_ref()
            .map(ResourceExt::name_any)
            .as_deref(),
        Some("ctr-deepfm-ps-dataset")
    );
    let (state, message, _) = condition(&status.conditions, "DatasetBuilt");
    assert_eq!(state, "False");
    assert_eq!(
        message,
        "Job ctr-deepfm-ps-dataset builds the training and evaluation sets from FeatureView ctr-events"
    );
    assert_eq!(
        status.queue.as_ref().map(|q| q.reason.as_str()),
        Some(message)
    );

    // Built: the gang starts on the sets it wrote.
    let built = observe_dataset(
        &job,
        &[],
        None,
        &settings,
        DatasetObservation::Found {
            input: view(),
            job: Some(Outcome::Succeeded {
                finished: Timestamp::UNIX_EPOCH,
                message: Some(r#"{"trainRows":900,"evalRows":100,"features":4}"#.into()),
            }),
        },
    );
    assert_eq!(
        condition(&built.plan.status.conditions, "DatasetBuilt").0,
        "True"
    );
    assert!(built.dataset_job.is_none());
    assert_eq!(built.create_pods.len(), 6, "2 servers and 4 workers");
    let worker = built
        .create_pods
        .iter()
        .find(|p| p.name_any() == "ctr-deepfm-ps-worker-0")
        .unwrap_or_else(|| panic!("no chief"));
    let env: Vec<(String, String)> = worker.spec.clone().unwrap_or_default().containers[0]
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|v| Some((v.name, v.value?)))
        .collect();
    assert!(env.contains(&(
        "FLYWHEEL_TRAIN_DATA".into(),
        "/var/lib/flywheel/models/ctr-deepfm-ps/dataset/train.parquet".into()
    )));
    assert!(env.contains(&(
        "FLYWHEEL_SCHEMA".into(),
        "/var/lib/flywheel/models/ctr-deepfm-ps/dataset/schema.json".into()
    )));
}

#[test]
fn a_failed_training_set_fails_the_job_with_the_builders_reason() {
    let settings = TrainerSettings::default();
    let job = view_job();
    let decided = observe_dataset(
        &job,
        &[],
        None,
        &settings,
        DatasetObservation::Found {
            input: view(),
            job: Some(Outcome::Failed {
                message: Some(
                    r#"{"event":"failed","error":"/e: no label column `clicked` (spec.data.featureView.label); it has user_id"}"#
                        .into(),
                ),
            }),
        },
    );
    let status = &decided.plan.status;
    assert_eq!(status.phase, Some(TrainingPhase::Failed));
    let (_, message, _) = condition(&status.conditions, "Failed");
    assert!(
        message
            .ends_with("no label column `clicked` (spec.data.featureView.label); it has user_id"),
        "{message}"
    );
    assert!(decided.create_pods.is_empty());
}

#[test]
fn a_job_waits_for_the_feature_view_it_names() {
    let settings = TrainerSettings::default();
    let job = view_job();
    let missing = DatasetObservation::Missing {
        reason: "FeatureViewMissing".into(),
        message: "waiting for FeatureView `ctr-events` (spec.data.featureView.name)".into(),
    };
    let decided = observe_dataset(&job, &[], None, &settings, missing);
    let status = &decided.plan.status;
    assert_eq!(status.phase, Some(TrainingPhase::Queued));
    assert_eq!(
        condition(&status.conditions, "DatasetBuilt").1,
        "waiting for FeatureView `ctr-events` (spec.data.featureView.name)"
    );
    assert!(decided.dataset_job.is_none() && decided.create_pods.is_empty());
}

#[test]
fn the_chief_result_is_the_last_json_line_of_its_message() {
    let message = format!("{{\"event\":\"progress\",\"step\":3}}\n{RESULT}\n");
    let result = chief_result(&message).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(result.steps, 120);
    assert_eq!(result.metrics.calibration, Some(1.01));
    assert!(chief_result("panicked at main.rs").is_err());
}
