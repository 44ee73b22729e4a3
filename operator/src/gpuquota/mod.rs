//! GPUQuota controller: validates the quota and decides gang admission for every TrainingJob that names it
//! (see [`crate::gpuquota::admission`]). The decision lives in the quota's status (`admitted`, `queued` in order,
//! `rejected`), which the TrainingJob controller reads: one writer per quota, so two jobs can never both take
//! the last GPUs.

pub mod admission;
pub mod plan;
pub mod watch;

use std::sync::Arc;

use flywheel_crds::GPUQuota;
use flywheel_crds::TrainingJob;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::Namespace;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};

use crate::controller::{Context, Error, apply_plan, cached_watch, run_controller_with};
pub use plan::{Observed, Standing, candidates, covers, plan, standing};

pub const KIND: &str = "GPUQuota";

pub struct Stores {
    pub jobs: Store<TrainingJob>,
    pub namespaces: Store<Namespace>,
}

pub async fn reconcile(
    quota: Arc<GPUQuota>,
    ctx: Arc<Context>,
    stores: &Stores,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    let plan = plan(&Observed {
        quota: &quota,
        candidates: candidates(&quota, &stores.jobs, &stores.namespaces),
        now: Timestamp::now(),
    });
    for used in &plan.status.used {
        let limit = quota.spec.limit_of(&used.resource).unwrap_or_default();
        ctx.metrics
            .set_quota_usage(&quota.name_any(), &used.resource, used.count, limit);
    }
    let api = Api::all(ctx.client.clone());
    apply_plan(
        &ctx,
        &api,
        quota.as_ref(),
        KIND,
        quota.status.as_ref(),
        plan,
    )
    .await
}

pub async fn run(ctx: Arc<Context>, stop: impl Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let (jobs, job_events) = cached_watch(
        Api::<TrainingJob>::all(client.clone()),
        watcher::Config::default(),
    );
    let job_events = job_events.touched_objects();
    let (namespaces, namespace_events) = cached_watch(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    );
    let namespace_events = namespace_events.touched_objects();
    let controller = Controller::new(Api::<GPUQuota>::all(client), watcher::Config::default());
    let quotas = controller.store();
    let stores = Arc::new(Stores { jobs, namespaces });
    let controller = controller
        // A job's arrival, change or deletion concerns the quota it names.
        .watches_stream(job_events, |job: TrainingJob| watch::quota_of_job(&job))
        // A namespace's labels decide which selector-scoped quotas cover it.
        .watches_stream(namespace_events, move |_: Namespace| {
            watch::selector_quotas(&quotas.state())
        });
    run_controller_with(KIND, controller, ctx, stop, move |quota, ctx| {
        let stores = stores.clone();
        async move { reconcile(quota, ctx, &stores).await }
    })
    .await;
}
