//! TrainingJob controller: turns a job into a gang of trainer pods admitted under its GPUQuota, restarts the
//! whole gang from its checkpoint when a member fails, and registers the result as a ModelVersion.
//!
//! Admission: a job naming a quota runs only once the quota's status lists it as admitted (see
//! [`crate::gpuquota`]). A job labelled `kueue.x-k8s.io/queue-name` is still held to that quota (the label is
//! no way around a team's limit); Kueue may admit it too, by setting `spec.suspend: false`, and the label is
//! passed to every pod.

mod builder;
pub mod chief;
pub mod dataset;
pub mod gang;
mod observed;
pub mod plan;
mod pod_health;
pub mod pods;
pub mod progress;
mod registration;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use flywheel_crds::trainingjob::{TrainingPhase, TrainingProgress};
use flywheel_crds::{FeatureView, GPUQuota, ModelVersion, Rollout, TrainingJob};
use jiff::Timestamp;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource, ResourceExt};
use tracing::{info, warn};

pub use dataset::{DatasetInput, DatasetObservation, ServedTraffic};
pub use gang::{KUEUE_QUEUE_LABEL, TrainerSettings};
pub use plan::{Observed, TrainingPlan, WarmStart, plan};

use crate::controller::{
    Context, Error, FIELD_MANAGER, apply_plan, cached_watch, run_controller_with,
    strip_managed_fields,
};
use crate::credentials;
use gang::{CHIEF, LABEL_JOB};

pub const KIND: &str = "TrainingJob";

/// Requeue after a failed reconcile.
/// How often the jobs-by-phase gauge is recounted.
const PHASE_GAUGE_INTERVAL: Duration = Duration::from_secs(5);

pub struct Stores {
    pub pods: Store<Pod>,
    pub quotas: Store<GPUQuota>,
}

fn owned_pods<'a>(job: &TrainingJob, pods: &'a [Arc<Pod>]) -> Vec<&'a Pod> {
    let namespace = job.namespace();
    let uid = job.uid();
    pods.iter()
        .map(Arc::as_ref)
        .filter(|pod| {
            pod.namespace() == namespace
                && pod
                    .owner_references()
                    .iter()
                    .any(|owner| Some(&owner.uid) == uid.as_ref() && owner.controller == Some(true))
        })
        .collect()
}

async fn warm_start(ctx: &Context, job: &TrainingJob) -> Result<WarmStart, Error> {
    let finished = matches!(
        job.status.as_ref().and_then(|s| s.phase),
        Some(TrainingPhase::Succeeded | TrainingPhase::Failed)
    );
    let Some(parent) = job.spec.warm_start_from.as_ref().filter(|_| !finished) else {
        return Ok(WarmStart::NotRequested);
    };
    let api: Api<ModelVersion> =
        Api::namespaced(ctx.client.clone(), &job.namespace().unwrap_or_default());
    Ok(match api.get_opt(&parent.name).await? {
        Some(version) => WarmStart::Found {
            uri: version.spec.artifact.uri,
            sha256: version.spec.artifact.sha256,
        },
        None => WarmStart::Missing(parent.name.clone()),
    })
}

async fn chief_progress(pods: &[&Pod], job: &TrainingJob) -> Option<TrainingProgress> {
    let attempt = job.status.as_ref().map_or(0, |s| s.attempt).to_string();
    let chief = pods.iter().find(|pod| {
        pod.name_any() == CHIEF.pod_name(&job.name_any())
            && pod.labels().get(gang::LABEL_ATTEMPT) == Some(&attempt)
            && pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })?;
    let ip = chief.status.as_ref()?.pod_ip.as_deref()?;
    progress::poll(ip).await
}

/// What the training-set step of a job on a FeatureView or on served traffic needs: its input and its Job's
/// outcome. Nothing is looked up once the job's status says its sets are built, or when it reads ready-made
/// sets.
async fn training_set(ctx: &Context, job: &TrainingJob) -> Result<DatasetObservation, Error> {
    let status = job.status.clone().unwrap_or_default();
    let finished = matches!(
        status.phase,
        Some(TrainingPhase::Succeeded | TrainingPhase::Failed)
    );
    let built = status
        .conditions
        .iter()
        .any(|c| c.type_ == dataset::CONDITION_DATASET_BUILT && c.status == "True");
    if finished || built || job.spec.data.dataset.is_some() {
        return Ok(DatasetObservation::NotNeeded);
    }
    let input = match dataset_input(ctx, job).await? {
        Ok(input) => input,
        Err(missing) => return Ok(missing),
    };
    let namespace = job.namespace().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let name = dataset::job_name(&job.name_any());
    let outcome = match jobs.get_opt(&name).await? {
        // A namesake from a deleted TrainingJob is not this job's step.
        Some(found)
            if found
                .owner_references()
                .iter()
                .any(|o| Some(&o.uid) == job.uid().as_ref()) =>
        {
            let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
            let pods = pods
                .list(&ListParams::default().labels(&format!("job-name={name}")))
                .await?
                .items;
            Some(crate::batch_job::outcome(&found, &pods))
        }
        Some(_) => {
            return Err(Error::Conflict(format!(
                "Job {name} exists and belongs to something else; delete it or rename the TrainingJob"
            )));
        }
        None => None,
    };
    Ok(DatasetObservation::Found {
        input,
        job: outcome,
    })
}

fn missing(reason: &str, message: String) -> DatasetObservation {
    DatasetObservation::Missing {
        reason: reason.to_owned(),
        message,
    }
}

/// The FeatureView, or the Rollout's traffic log and served model; what is missing, as an observation.
async fn dataset_input(
    ctx: &Context,
    job: &TrainingJob,
) -> Result<Result<DatasetInput, DatasetObservation>, Error> {
    let namespace = job.namespace().unwrap_or_default();
    if let Some(data) = &job.spec.data.feature_view {
        let views: Api<FeatureView> = Api::namespaced(ctx.client.clone(), &namespace);
        return Ok(match views.get_opt(&data.name).await? {
            Some(view) => Ok(DatasetInput::View(Box::new(view))),
            None => Err(missing(
                "FeatureViewMissing",
                format!(
                    "waiting for FeatureView `{}` (spec.data.featureView.name)",
                    data.name
                ),
            )),
        });
    }
    let Some(data) = &job.spec.data.served_traffic else {
        return Ok(Err(DatasetObservation::NotNeeded));
    };
    let rollouts: Api<Rollout> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(rollout) = rollouts.get_opt(&data.rollout).await? else {
        return Ok(Err(missing(
            "RolloutMissing",
            format!(
                "waiting for Rollout `{}` (spec.data.servedTraffic.rollout)",
                data.rollout
            ),
        )));
    };
    let Some(log) = rollout
        .spec
        .feedback
        .as_ref()
        .and_then(|f| f.traffic_log.as_ref())
    else {
        return Ok(Err(missing(
            "TrafficNotLogged",
            format!(
                "Rollout `{}` logs no traffic: set its spec.feedback.trafficLog",
                data.rollout
            ),
        )));
    };
    let Some(stable) = rollout
        .status
        .as_ref()
        .and_then(|s| s.stable_version.clone())
    else {
        return Ok(Err(missing(
            "NothingServed",
            format!("Rollout `{}` serves no version yet", data.rollout),
        )));
    };
    let versions: Api<ModelVersion> = Api::namespaced(ctx.client.clone(), &namespace);
    let Some(version) = versions.get_opt(&stable).await? else {
        return Ok(Err(missing(
            "NothingServed",
            format!(
                "ModelVersion `{stable}`, which Rollout `{}` serves, does not exist",
                data.rollout
            ),
        )));
    };
    Ok(Ok(DatasetInput::Traffic(ServedTraffic {
        log: log.uri.clone(),
        model_uri: version.spec.artifact.uri.clone(),
        model_sha256: version.spec.artifact.sha256.clone(),
    })))
}

/// Registers the produced ModelVersion. Its name is the job's; when a ModelVersion of that name exists from
/// another job (a deleted job's namesake), the job's UID prefix makes the name unique. Returns the name used.
async fn register(ctx: &Context, version: &ModelVersion, job_uid: &str) -> Result<String, Error> {
    let namespace = version.namespace().unwrap_or_default();
    let api: Api<ModelVersion> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut candidate = version.clone();
    let base = version.name_any();
    for name in [
        base.clone(),
        format!("{base}-{}", &job_uid[..job_uid.len().min(8)]),
    ] {
        candidate.metadata.name = Some(name.clone());
        match api.create(&PostParams::default(), &candidate).await {
            Ok(_) => return Ok(name),
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let existing = api.get(&name).await?;
                if existing
                    .annotations()
                    .get(plan::ANNOTATION_JOB_UID)
                    .map(String::as_str)
                    == Some(job_uid)
                {
                    return Ok(name);
                }
            }
            Err(err) => return Err(err.into()),
        }
    }
    Err(Error::Conflict(format!(
        "ModelVersions {base} and {base}-<uid> both exist and come from other jobs"
    )))
}

pub async fn reconcile(
    job: Arc<TrainingJob>,
    ctx: Arc<Context>,
    stores: Arc<Stores>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    let namespace = job.namespace().unwrap_or_default();
    let all_pods = stores.pods.state();
    let pods = owned_pods(&job, &all_pods);
    let quota = job
        .spec
        .queue
        .as_ref()
        .and_then(|name| stores.quotas.get(&ObjectRef::new(name)));
    let progress = chief_progress(&pods, &job).await;
    let warm_start = warm_start(&ctx, &job).await?;
    let dataset = training_set(&ctx, &job).await?;
    let mut decided = plan(&Observed {
        job: &job,
        pods,
        quota: quota.as_deref(),
        warm_start,
        progress,
        settings: &ctx.trainer,
        dataset,
        now: Timestamp::now(),
    });

    if let Some(version) = &decided.model_version {
        let name = register(&ctx, version, &job.uid().unwrap_or_default()).await?;
        decided.plan.status.model_version = Some(name);
    }
    if let Some(waited) = decided.admitted_after {
        ctx.metrics.job_admitted(waited);
    }
    if decided.restarted {
        ctx.metrics.gang_restarted();
    }
    let pods_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let status_before = job.status.clone();
    // Status first: the attempt it records is what tells the next reconcile which pods are stale.
    let action = apply_plan(
        &ctx,
        &Api::<TrainingJob>::namespaced(ctx.client.clone(), &namespace),
        job.as_ref(),
        KIND,
        status_before.as_ref(),
        decided.plan,
    )
    .await?;
    for name in &decided.delete_pods {
        match pods_api.delete(name, &DeleteParams::background()).await {
            Ok(_) => info!(job = %job.name_any(), pod = %name, "deleted pod"),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => return Err(err.into()),
        }
    }
    if let Some(dataset_job) = &decided.dataset_job {
        match Api::<Job>::namespaced(ctx.client.clone(), &namespace)
            .create(&PostParams::default(), dataset_job)
            .await
        {
            Ok(_) => {
                info!(job = %job.name_any(), dataset_job = %dataset_job.name_any(), "started the training-set Job")
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(err) => return Err(err.into()),
        }
    }
    if let Some(service) = &decided.service {
        let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
        services
            .patch(
                &service.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(service),
            )
            .await?;
    }
    if let Some(policy) = &decided.network_policy {
        Api::<NetworkPolicy>::namespaced(ctx.client.clone(), &namespace)
            .patch(
                &policy.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(policy),
            )
            .await?;
    }
    if !decided.create_pods.is_empty() && gang::has_gang_rpc(&job.spec.topology) {
        // Before the pods that mount it: a member without its token could not reach the others.
        credentials::ensure(
            &Api::namespaced(ctx.client.clone(), &namespace),
            &gang::credentials_name(&job.name_any()),
            serde_json::to_value(gang::owner_reference(&job)).ok(),
            serde_json::to_value(gang::selector_labels(&job.name_any()))?,
            &[flywheel_auth::GANG_TOKEN_KEY],
        )
        .await?;
    }
    for pod in &decided.create_pods {
        match pods_api.create(&PostParams::default(), pod).await {
            Ok(_) => {}
            // The store lagged behind a pod this operator made: it exists, which is what we want.
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            // Refused by admission (a missing RuntimeClass, a policy): the user must see why nothing runs.
            Err(kube::Error::Api(status)) if matches!(status.code, 403 | 422) => {
                let event = Event {
                    type_: EventType::Warning,
                    reason: "PodRejected".to_owned(),
                    note: Some(status.message.chars().take(1000).collect()),
                    action: "CreatePod".to_owned(),
                    secondary: None,
                };
                if let Err(err) = ctx.recorder.publish(&event, &job.object_ref(&())).await {
                    warn!(job = %job.name_any(), error = %err, "could not record event");
                }
                return Err(kube::Error::Api(status).into());
            }
            Err(err) => return Err(err.into()),
        }
    }
    if !decided.create_pods.is_empty() {
        info!(job = %job.name_any(), pods = decided.create_pods.len(), "created pods");
    }
    Ok(action)
}

fn count_phases(ctx: &Context, jobs: &Store<TrainingJob>) {
    let mut counts = std::collections::BTreeMap::<&'static str, i64>::new();
    for job in jobs.state() {
        let phase = match job.status.as_ref().and_then(|s| s.phase) {
            Some(TrainingPhase::Queued) => "Queued",
            Some(TrainingPhase::Running) => "Running",
            Some(TrainingPhase::Restarting) => "Restarting",
            Some(TrainingPhase::Suspended) => "Suspended",
            Some(TrainingPhase::Succeeded) => "Succeeded",
            Some(TrainingPhase::Failed) => "Failed",
            None => "Pending",
        };
        *counts.entry(phase).or_default() += 1;
    }
    ctx.metrics.set_jobs_by_phase(&counts);
}

pub async fn run(ctx: Arc<Context>, stop: impl Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let (jobs, job_events) = cached_watch(
        Api::<TrainingJob>::all(client.clone()),
        watcher::Config::default(),
    );
    let job_events = job_events.applied_objects();
    let (pods, pod_events) = cached_watch(
        Api::<Pod>::all(client.clone()),
        watcher::Config::default().labels(LABEL_JOB),
    );
    let pod_events = pod_events.touched_objects();
    let (quotas, quota_events) = cached_watch(
        Api::<GPUQuota>::all(client.clone()),
        watcher::Config::default(),
    );
    let quota_events = quota_events.touched_objects();
    // The training-set Jobs: their end moves their TrainingJob on.
    let dataset_job_events = watcher(
        Api::<Job>::all(client.clone()),
        watcher::Config::default().labels(dataset::LABEL_DATASET_OF),
    )
    .default_backoff()
    .modify(strip_managed_fields)
    .touched_objects();
    let stores = Arc::new(Stores { pods, quotas });
    let mapper_jobs = jobs.clone();
    let controller = Controller::for_stream(job_events, jobs.clone())
        .owns_stream(pod_events)
        .owns_stream(dataset_job_events)
        .watches_stream(quota_events, move |quota: GPUQuota| {
            watch::jobs_of_quota(&mapper_jobs.state(), &quota)
        });
    let controller = run_controller_with(KIND, controller, ctx.clone(), stop, move |job, ctx| {
        reconcile(job, ctx, stores.clone())
    });
    let gauge = async move {
        loop {
            tokio::time::sleep(PHASE_GAUGE_INTERVAL).await;
            count_phases(&ctx, &jobs);
        }
    };
    futures::pin_mut!(controller, gauge);
    futures::future::select(controller, gauge).await;
}

#[cfg(test)]
mod tests;
