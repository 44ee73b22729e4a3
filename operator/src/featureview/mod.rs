//! FeatureView controller: validates the spec, runs materialization as Jobs on `materialization.schedule` (the
//! operator schedules them itself: a 1.20 API server has no batch/v1 CronJob), runs the ingestion Deployment
//! while the view has a stream source, and reports in status the last materialization (from the Job's
//! termination message), the schema hash, the baseline statistics and drift, with a `Drifted` condition.
//!
//! Scheduling: one run at a time (a run is due at the schedule's next time after the newest Job's creation;
//! the first at once); a Job is named after its scheduled time, so a restarted operator applying it again
//! changes nothing. Each Job reads events after the last watermark, so a failed run is retried by the next.
//! Without a schedule the view is materialized once. The newest [`plan::JOB_HISTORY`] finished Jobs are kept.

pub mod builders;
pub mod plan;

use std::sync::Arc;

use flywheel_crds::FeatureView;
use jiff::Timestamp;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::ListParams;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Api, Resource, ResourceExt};

use crate::batch_job::{self, Outcome};
use crate::controller::{Context, Error, apply_plan, run_controller_with};
use plan::{JobRun, JobState, Observed, plan};

pub const KIND: &str = "FeatureView";
/// Label on a view's Jobs, ingestion Deployment and their pods.
pub const LABEL_VIEW: &str = "flywheel.dev/feature-view";

/// The Job as the plan sees it; a finished Job's report comes from its pod's termination message.
fn job_run(job: &Job, pods: &[Pod]) -> JobRun {
    let state = match batch_job::outcome(job, pods) {
        Outcome::Running => JobState::Running,
        Outcome::Succeeded { finished, message } => JobState::Succeeded {
            finished,
            report: message.and_then(|m| serde_json::from_str(&m).ok()),
        },
        Outcome::Failed { message } => JobState::Failed {
            message: message.unwrap_or_else(|| "no termination message".into()),
        },
    };
    JobRun {
        name: job.name_any(),
        created: job
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or(Timestamp::UNIX_EPOCH, |t| t.0),
        state,
    }
}

pub async fn reconcile(view: Arc<FeatureView>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    let namespace = view.namespace().unwrap_or_default();
    let name = view.name_any();
    let jobs_api: Api<Job> = Api::namespaced(ctx.client.clone(), &namespace);
    let selector = ListParams::default().labels(&format!("{LABEL_VIEW}={name}"));
    let mut jobs: Vec<Job> = jobs_api
        .list(&selector)
        .await?
        .items
        .into_iter()
        .filter(|job| {
            job.owner_references()
                .iter()
                .any(|o| Some(&o.uid) == view.meta().uid.as_ref())
        })
        .collect();
    jobs.sort_by_key(|job| {
        std::cmp::Reverse(job.metadata.creation_timestamp.as_ref().map(|t| t.0))
    });
    // Only the newest finished Job's pods are read, for its report.
    let newest_finished = jobs.iter().find(|job| {
        job.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .flatten()
                .any(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True")
        })
    });
    let pods = match newest_finished {
        Some(job) => {
            Api::<Pod>::namespaced(ctx.client.clone(), &namespace)
                .list(&ListParams::default().labels(&format!("job-name={}", job.name_any())))
                .await?
                .items
        }
        None => Vec::new(),
    };
    let runs: Vec<JobRun> = jobs.iter().map(|job| job_run(job, &pods)).collect();
    let planned = plan(&Observed {
        view: &view,
        now: Timestamp::now(),
        jobs: &runs,
        trainer: &ctx.trainer,
        serving: &ctx.serving,
    })?;
    let api = Api::namespaced(ctx.client.clone(), &namespace);
    apply_plan(
        &ctx,
        &api,
        view.as_ref(),
        KIND,
        view.status.as_ref(),
        planned,
    )
    .await
}

pub async fn run(ctx: Arc<Context>, stop: impl Future<Output = ()> + Send + Sync + 'static) {
    let views: Api<FeatureView> = Api::all(ctx.client.clone());
    let jobs: Api<Job> = Api::all(ctx.client.clone());
    let controller = Controller::new(views, watcher::Config::default())
        .owns(jobs, watcher::Config::default().labels(LABEL_VIEW));
    run_controller_with::<FeatureView, _, _>(KIND, controller, ctx, stop, reconcile).await;
}
