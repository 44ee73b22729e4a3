//! The apply half every controller shares (status server-side apply, Events, requeue), its error type, and
//! the loop that runs one kube-runtime Controller per kind until shutdown.

use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PropagationPolicy};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::{debug, warn};

use crate::alerts::AlertBoard;
use crate::config::{ServingSettings, TrainerSettings};
use crate::credentials::CredentialsError;
use crate::metrics::Metrics;
use crate::plan::{Children, FinalizerChange, Plan, REASON_INVALID_SPEC};

/// The one field manager of everything the operator writes with server-side apply.
pub const FIELD_MANAGER: &str = "flywheel-operator";

/// Requeue after a failed reconcile. kube-runtime's scheduler deduplicates, so a burst of failures for one
/// object costs one retry.
/// Reconciles in flight per controller: a burst of objects (ArgoCD syncing many at once) queues instead of
/// holding a connection and its buffers per object (1000 Rollouts: 36 MiB RSS bounded, 112 MiB unbounded).
pub const RECONCILE_CONCURRENCY: u16 = 16;

pub fn controller_config() -> kube::runtime::controller::Config {
    kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY)
}

pub const ERROR_REQUEUE: Duration = Duration::from_secs(10);

pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    /// What every training gang's pods get: image, shared storage.
    pub trainer: TrainerSettings,
    /// What every serving pod gets: image, the artifacts' storage.
    pub serving: ServingSettings,
    /// Alerts reported by Alertmanager's webhook.
    pub alerts: Arc<AlertBoard>,
}

impl Context {
    pub fn new(
        client: Client,
        metrics: Arc<Metrics>,
        identity: &str,
        trainer: TrainerSettings,
        serving: ServingSettings,
        alerts: Arc<AlertBoard>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: Some(identity.to_owned()),
        };
        let recorder = Recorder::new(client.clone(), reporter);
        Context {
            client,
            metrics,
            recorder,
            trainer,
            serving,
            alerts,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("encoding status: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
}

impl Error {
    /// Low-cardinality label for the error metric.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Kube(kube::Error::Api(status)) if status.code == 409 => "conflict",
            Error::Kube(kube::Error::Api(status)) if status.code == 404 => "not_found",
            Error::Kube(kube::Error::Api(status)) if status.code == 422 => "invalid",
            Error::Kube(kube::Error::Api(_)) => "api",
            Error::Kube(_) => "transport",
            Error::Encode(_) => "encode",
            Error::Conflict(_) => "conflict",
            Error::Credentials(_) => "credentials",
        }
    }
}

/// Carries out a plan: adds the finalizer it asks for, applies its children and deletes the ones it no longer
/// wants, server-side applies the status when it changed, publishes the planned Events, removes the finalizer
/// it lets go, and turns the requeue into an Action. Events are best effort: failing to record one never fails
/// the reconcile.
pub async fn apply_plan<K, S>(
    ctx: &Context,
    api: &Api<K>,
    object: &K,
    kind: &'static str,
    current_status: Option<&S>,
    plan: Plan<S>,
) -> Result<Action, Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize + PartialEq,
{
    if let Some(FinalizerChange::Add(finalizer)) = plan.finalizer {
        set_finalizer(api, object, Some(finalizer)).await?;
    }
    apply_children(ctx, object, &plan.children).await?;
    if let Some(FinalizerChange::Remove(_)) = plan.finalizer
        && object.meta().deletion_timestamp.is_some()
    {
        // The deletion finishes now: the object goes away, status included.
        set_finalizer(api, object, None).await?;
        return Ok(Action::await_change());
    }
    if current_status != Some(&plan.status) {
        let patch = serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": serde_json::to_value(&plan.status)?,
        });
        api.patch_status(
            &object.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await?;
        debug!(kind, name = %object.name_any(), "status applied");
    }
    let reference = object.object_ref(&());
    for planned in plan.events {
        if planned.reason == REASON_INVALID_SPEC {
            ctx.metrics.invalid_spec(kind);
        }
        let event = Event {
            type_: if planned.warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: planned.reason.to_owned(),
            note: Some(planned.note),
            action: planned.action.to_owned(),
            secondary: None,
        };
        if let Err(err) = ctx.recorder.publish(&event, &reference).await {
            warn!(kind, name = %object.name_any(), error = %err, "could not record event");
        }
    }
    if let Some(FinalizerChange::Remove(_)) = plan.finalizer {
        set_finalizer(api, object, None).await?;
    }
    Ok(plan
        .requeue
        .map_or_else(Action::await_change, Action::requeue))
}

/// Applies the planned children in order, then deletes the ones planned to go (404 counts as deleted).
async fn apply_children<K>(ctx: &Context, owner: &K, children: &Children) -> Result<(), Error>
where
    K: Resource<DynamicType = ()>,
{
    if children.apply.is_empty() && children.delete.is_empty() {
        return Ok(());
    }
    let namespace = owner.meta().namespace.clone().unwrap_or_default();
    let params = PatchParams::apply(FIELD_MANAGER).force();
    for child in &children.apply {
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &namespace, &child.resource);
        api.patch(child.name(), &params, &Patch::Apply(&child.object))
            .await?;
    }
    let background = DeleteParams {
        propagation_policy: Some(PropagationPolicy::Background),
        ..DeleteParams::default()
    };
    for gone in &children.delete {
        let api: Api<DynamicObject> =
            Api::namespaced_with(ctx.client.clone(), &namespace, &gone.resource);
        match api.delete(&gone.name, &background).await {
            Ok(_) => debug!(kind = gone.resource.kind, name = gone.name, "child deleted"),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(())
}

/// The finalizer's field manager: separate from status and children, so applying `[]` removes only
/// Flywheel's entry and leaves other controllers' finalizers alone.
const FINALIZER_MANAGER: &str = "flywheel-operator-finalizer";

async fn set_finalizer<K>(api: &Api<K>, object: &K, finalizer: Option<&str>) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
{
    let finalizers: Vec<&str> = finalizer.into_iter().collect();
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": {"name": object.name_any(), "finalizers": finalizers},
    });
    api.patch(
        &object.name_any(),
        &PatchParams::apply(FINALIZER_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

/// A watch of `api` (objects matching `config`) cached in a store without `managedFields`: the store, and the
/// watch events after the store took them, for a Controller's main stream (`applied_objects`) or its
/// secondary watches (`touched_objects`). Watch errors are retried with backoff.
pub fn cached_watch<K>(
    api: Api<K>,
    config: watcher::Config,
) -> (
    Store<K>,
    impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
)
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (store, writer) = reflector::store();
    let events = watcher(api, config)
        .default_backoff()
        .modify(strip_managed_fields)
        .reflect(writer);
    (store, events)
}

/// Drops `managedFields` from watched objects: the operator never reads them, and on pods they are a large
/// share of the memory a store holds.
pub fn strip_managed_fields<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// Runs one Controller over every object of `K` until `stop` resolves. Watch and reconcile errors are logged
/// and retried with backoff; nothing an object contains can end this loop.
pub async fn run_controller<K, F, Fut>(
    kind: &'static str,
    ctx: Arc<Context>,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
    reconcile: F,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    F: FnMut(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    let api: Api<K> = Api::all(ctx.client.clone());
    run_controller_with(
        kind,
        Controller::new(api, watcher::Config::default()),
        ctx,
        stop,
        reconcile,
    )
    .await;
}

/// [`run_controller`] for a controller built by the caller (to keep its store, or add watches).
pub async fn run_controller_with<K, F, Fut>(
    kind: &'static str,
    controller: Controller<K>,
    ctx: Arc<Context>,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
    reconcile: F,
) where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    F: FnMut(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action, Error>> + Send + 'static,
{
    controller
        .with_config(controller_config())
        .graceful_shutdown_on(stop)
        .run(reconcile, move |object: Arc<K>, error: &Error, ctx: Arc<Context>| {
            ctx.metrics.reconcile_failed(kind, error.label());
            warn!(kind, name = %object.name_any(), namespace = object.namespace(), error = %error, "reconcile failed");
            Action::requeue(ERROR_REQUEUE)
        }, ctx)
        .for_each(move |result| async move {
            if let Err(err) = result {
                warn!(kind, error = %err, "controller error");
            }
        })
        .await;
}
