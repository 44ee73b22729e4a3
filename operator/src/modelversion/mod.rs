//! ModelVersion controller: validates the spec, pins the artifact accepted first so a later edit of it is
//! refused (the controller-side mirror of the CEL immutability rule), and evaluates the validation gates into
//! `Validated` or `Rejected`, and derives from the Rollouts of its namespace which of them serve it: the
//! `production` (stable) and `canary` aliases with their promotion history, `servedBy`, and the in-use
//! finalizer that keeps a served version from being deleted.

pub mod gates;
pub mod plan;
pub mod watch;

use std::sync::Arc;

use flywheel_crds::{ModelVersion, Rollout};
use jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::runtime::reflector::Store;
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, ResourceExt};

use crate::controller::{Context, Error, apply_plan, cached_watch, run_controller_with};
use plan::{Observed, plan};

pub const KIND: &str = "ModelVersion";

pub async fn reconcile(
    version: Arc<ModelVersion>,
    ctx: Arc<Context>,
    stores: &Stores,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    let namespace = version.namespace();
    let others: Vec<Arc<ModelVersion>> = stores
        .versions
        .state()
        .into_iter()
        .filter(|other| other.namespace() == namespace)
        .collect();
    let rollouts: Vec<Arc<Rollout>> = stores
        .rollouts
        .state()
        .into_iter()
        .filter(|rollout| rollout.namespace() == namespace)
        .collect();
    let plan = plan(&Observed {
        version: &version,
        others: &others,
        rollouts: &rollouts,
        now: Timestamp::now(),
    });
    let api: Api<ModelVersion> =
        Api::namespaced(ctx.client.clone(), &namespace.clone().unwrap_or_default());
    apply_plan(
        &ctx,
        &api,
        version.as_ref(),
        KIND,
        version.status.as_ref(),
        plan,
    )
    .await
}

pub struct Stores {
    versions: Store<ModelVersion>,
    rollouts: Store<Rollout>,
}

pub async fn run(ctx: Arc<Context>, stop: impl Future<Output = ()> + Send + Sync + 'static) {
    // The controller's own cache of every ModelVersion resolves gate baselines; a cache of Rollouts gives
    // aliases and use, and a Rollout's change re-reconciles the versions it names or served.
    let (versions, version_events) = cached_watch(
        Api::<ModelVersion>::all(ctx.client.clone()),
        watcher::Config::default(),
    );
    let version_events = version_events.applied_objects();
    let controller = Controller::for_stream(version_events, versions.clone());
    let (rollouts, rollout_events) = cached_watch(
        Api::<Rollout>::all(ctx.client.clone()),
        watcher::Config::default(),
    );
    let rollout_events = rollout_events.touched_objects();
    let mapper_versions = versions.clone();
    let controller = controller.watches_stream(rollout_events, move |rollout: Rollout| {
        watch::versions_of_rollout(&mapper_versions.state(), &rollout)
    });
    let stores = Arc::new(Stores { versions, rollouts });
    run_controller_with(KIND, controller, ctx, stop, move |version, ctx| {
        let stores = stores.clone();
        async move { reconcile(version, ctx, &stores).await }
    })
    .await;
}
