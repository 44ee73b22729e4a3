//! Rollout controller: observe (the target ModelVersion from a cache, firing alerts, an analysis round against
//! Prometheus when one is due), plan (`plan.rs`, pure), apply: the serving workloads and the router's route
//! table first, so status never claims a weight that is not in force, then status and Events. An abort also
//! pushes the new route table to every router pod at once, not waiting for the mounted ConfigMap to refresh.

pub mod analysis;
pub mod children;
pub mod health;
pub mod network;
pub mod observed;
pub mod online;
pub mod plan;
pub mod prometheus;
pub mod steps;
pub mod traffic;
pub mod traffic_log;
pub mod watch;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use flywheel_auth::{ADMIN_TOKEN_KEY, FEEDBACK_TOKEN_KEY, Token};
use flywheel_crds::rollout::RolloutStatus;
use flywheel_crds::{FeatureView, ModelVersion, Rollout};
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use kube::api::ListParams;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use tracing::warn;

use crate::controller::{Context, Error, apply_plan, cached_watch, run_controller_with};
use crate::credentials::{self, CredentialsError};
use crate::plan::OwnedObject;
use crate::rollout::prometheus::Access;
use analysis::{QueryContext, QueryResult};
use children::{canary_live, split_of};
use online::OnlineView;
use traffic::{LABEL_ROLE, LABEL_ROLLOUT, LABEL_VERSION};

pub const KIND: &str = "Rollout";
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
const PUSH_TIMEOUT: Duration = Duration::from_secs(1);

/// Alerts of `spec.alerts` firing in Prometheus for this rollout's model, in its namespace.
async fn firing_in_prometheus(rollout: &Rollout, prometheus: &str, access: &Access) -> Vec<String> {
    let name = rollout.name_any();
    let namespace = rollout.namespace().unwrap_or_default();
    let canary = rollout
        .status
        .as_ref()
        .and_then(|status| status.canary_version.clone())
        .unwrap_or_default();
    let context = QueryContext {
        rollout: &name,
        namespace: &namespace,
        stable: "",
        canary: &canary,
        interval: String::new(),
    };
    let mut firing = Vec::new();
    for alert in &rollout.spec.alerts {
        let query = analysis::alert_query(alert, &context);
        if let QueryResult::Value(count) =
            analysis::instant_query(prometheus, &query, access, QUERY_TIMEOUT).await
            && count > 0.0
        {
            firing.push(alert.clone());
        }
    }
    firing
}

/// How to reach the analysis's Prometheus: its Secret's CA and credentials, and the tenant. A Secret that is
/// missing or wrong is an error every query of the round reports (and `onError` handles).
async fn prometheus_access(
    ctx: &Context,
    namespace: &str,
    analysis: &flywheel_crds::rollout::Analysis,
) -> Result<Access, String> {
    let Some(name) = &analysis.prometheus_secret else {
        return Ok(Access {
            tenant: analysis.tenant.clone(),
            ..Access::default()
        });
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(|err| format!("reading the Prometheus Secret {name}: {err}"))?
        .ok_or_else(|| format!("the Prometheus Secret {name} does not exist"))?;
    let data: BTreeMap<String, Vec<u8>> = secret
        .data
        .unwrap_or_default()
        .into_iter()
        .map(|(key, value)| (key, value.0))
        .collect();
    Access::from_secret(name, &data, analysis.tenant.clone()).map_err(|err| err.to_string())
}

async fn run_analysis(
    rollout: &Rollout,
    access: &Result<Access, String>,
) -> Option<Vec<(String, analysis::Verdict)>> {
    let spec = rollout.spec.analysis.as_ref()?;
    let status = rollout.status.as_ref()?;
    let access = match access {
        Ok(access) => access,
        Err(message) => {
            let failed = QueryResult::Error(message.clone());
            return Some(
                spec.metrics
                    .iter()
                    .map(|metric| {
                        let verdict = analysis::judge(metric, &failed, None, spec.min_samples);
                        (metric.name.clone(), verdict)
                    })
                    .collect(),
            );
        }
    };
    let name = rollout.name_any();
    let namespace = rollout.namespace().unwrap_or_default();
    let context = QueryContext {
        rollout: &name,
        namespace: &namespace,
        stable: status.stable_version.as_deref().unwrap_or_default(),
        canary: status.canary_version.as_deref().unwrap_or_default(),
        interval: analysis::range(spec.interval.parse().unwrap_or(Duration::from_secs(60))),
    };
    let samples = if spec.metrics.iter().any(analysis::needs_labels) {
        match analysis::instant_query(
            &spec.prometheus,
            &analysis::samples_query(&context),
            access,
            QUERY_TIMEOUT,
        )
        .await
        {
            QueryResult::Value(value) => Some(value),
            _ => Some(0.0),
        }
    } else {
        None
    };
    let mut results = Vec::new();
    for metric in &spec.metrics {
        let query = analysis::query(metric, &context);
        let result = analysis::instant_query(&spec.prometheus, &query, access, QUERY_TIMEOUT).await;
        results.push((
            metric.name.clone(),
            analysis::judge(metric, &result, samples, spec.min_samples),
        ));
    }
    Some(results)
}

/// The caches a Rollout reconcile reads: ModelVersions, and the Deployments and Services labelled with a
/// rollout (the sweep's view of what each owns).
pub struct Stores {
    versions: Store<ModelVersion>,
    deployments: Store<Deployment>,
    services: Store<Service>,
}

pub async fn reconcile(
    rollout: Arc<Rollout>,
    ctx: Arc<Context>,
    stores: Arc<Stores>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    let namespace = rollout.namespace().unwrap_or_default();
    let name = rollout.name_any();
    let version = |version: &str| {
        stores
            .versions
            .get(&ObjectRef::<ModelVersion>::new(version).within(&namespace))
    };
    let target = version(&rollout.spec.model_version);
    let now = Timestamp::now();
    let status = rollout.status.clone().unwrap_or_default();
    let mut firing = ctx.alerts.firing(
        &(namespace.clone(), name.clone()),
        now,
        status.canary_version.as_deref(),
    );
    let access = match &rollout.spec.analysis {
        Some(analysis) if canary_live(&status) => {
            Some(prometheus_access(&ctx, &namespace, analysis).await)
        }
        _ => None,
    };
    if let (Some(analysis), Some(Ok(access))) = (&rollout.spec.analysis, &access)
        && !rollout.spec.alerts.is_empty()
    {
        firing.extend(firing_in_prometheus(&rollout, &analysis.prometheus, access).await);
    }
    let analysis = match &access {
        Some(access) if plan::analysis_due(&rollout, now) => run_analysis(&rollout, access).await,
        _ => None,
    };
    let online = online_view(&ctx, &rollout, &namespace).await?;
    let tokens = credentials::ensure(
        &Api::<Secret>::namespaced(ctx.client.clone(), &namespace),
        &traffic::credentials_name(&name),
        Some(crate::objects::owner(rollout.as_ref())),
        json!({LABEL_ROLLOUT: name, LABEL_ROLE: "credentials"}),
        &[ADMIN_TOKEN_KEY, FEEDBACK_TOKEN_KEY],
    )
    .await?;
    let admin_token = tokens
        .get(ADMIN_TOKEN_KEY)
        .ok_or(CredentialsError::MissingKey(ADMIN_TOKEN_KEY))?;
    // Listed once: read back for drift now, sent the new table after planning.
    let routers = match &rollout.spec.traffic.router {
        Some(_) => router_pods(&ctx, &namespace, &name).await,
        None => Vec::new(),
    };
    let drifted_routers = match split_of(&status) {
        Some(split) => {
            let table = traffic::route_table(&name, &namespace, &split);
            drifted_routers(&routers, &table, admin_token).await
        }
        None => Vec::new(),
    };
    let canary_pods = match status.canary_version.as_deref() {
        Some(canary) if canary_live(&status) => {
            Some(version_pods(&ctx, &stores, &namespace, &name, canary).await?)
        }
        _ => None,
    };
    let stable_pods = match status.stable_version.as_deref() {
        Some(stable) => Some(version_pods(&ctx, &stores, &namespace, &name, stable).await?),
        None => None,
    };
    let traffic_log_pods = match rollout
        .spec
        .feedback
        .as_ref()
        .and_then(|f| f.traffic_log.as_ref())
    {
        Some(_) => Some(traffic_log_pods(&ctx, &stores, &namespace, &name).await?),
        None => None,
    };
    let candidates: BTreeSet<&str> = [
        status.stable_version.as_deref(),
        status.canary_version.as_deref(),
        Some(rollout.spec.model_version.as_str()),
    ]
    .into_iter()
    .flatten()
    .collect();
    let found: Vec<Arc<ModelVersion>> = candidates.into_iter().filter_map(version).collect();
    let versions: Vec<&ModelVersion> = found.iter().map(AsRef::as_ref).collect();
    let owned = owned_workloads(&stores, &namespace, &name);
    let digest = tokens.digest();
    let planned = plan::plan(&plan::Observed {
        rollout: &rollout,
        target: target.as_deref(),
        analysis,
        firing,
        online,
        drifted_routers,
        canary_pods,
        stable_pods,
        traffic_log_pods,
        versions: &versions,
        owned: &owned,
        serving: &ctx.serving,
        credentials_digest: &digest,
        now,
    })?;
    if let Some(table) = &planned.push_routes {
        push_routes(&routers, table, admin_token).await;
    }
    let roles = |status: &RolloutStatus| {
        let canary = status
            .canary_version
            .clone()
            .filter(|_| canary_live(status));
        (status.stable_version.clone(), canary)
    };
    let (stable_before, canary_before) = roles(&status);
    let (stable_after, canary_after) = roles(&planned.plan.status);
    ctx.metrics.set_rollout_versions(
        &namespace,
        &name,
        [
            (stable_before.as_deref(), "stable"),
            (canary_before.as_deref(), "canary"),
        ],
        [
            (stable_after.as_deref(), "stable"),
            (canary_after.as_deref(), "canary"),
        ],
    );
    if let Some(reason) = &planned.aborted {
        ctx.metrics.rollout_aborted();
        warn!(namespace, name, reason, "canary aborted");
    }
    let api = Api::namespaced(ctx.client.clone(), &namespace);
    apply_plan(
        &ctx,
        &api,
        rollout.as_ref(),
        KIND,
        rollout.status.as_ref(),
        planned.plan,
    )
    .await
}

/// The cached Deployments and Services labelled with this rollout.
fn owned_workloads(stores: &Stores, namespace: &str, name: &str) -> Vec<OwnedObject> {
    let mine = |meta: &kube::api::ObjectMeta| {
        meta.namespace.as_deref() == Some(namespace)
            && meta
                .labels
                .as_ref()
                .and_then(|l| l.get(LABEL_ROLLOUT))
                .map(String::as_str)
                == Some(name)
    };
    let deployments = stores
        .deployments
        .state()
        .into_iter()
        .filter(|d| mine(&d.metadata))
        .map(|d| OwnedObject::of(d.as_ref()));
    let services = stores
        .services
        .state()
        .into_iter()
        .filter(|s| mine(&s.metadata))
        .map(|s| OwnedObject::of(s.as_ref()));
    deployments.chain(services).collect()
}

/// The FeatureView the rollout names for online features.
async fn online_view(
    ctx: &Context,
    rollout: &Rollout,
    namespace: &str,
) -> Result<OnlineView, Error> {
    let Some(online) = &rollout.spec.online_features else {
        return Ok(OnlineView::NotNamed);
    };
    let views: Api<FeatureView> = Api::namespaced(ctx.client.clone(), namespace);
    Ok(match views.get_opt(&online.feature_view).await? {
        Some(view) => OnlineView::Found(Box::new(view)),
        None => OnlineView::Missing(online.feature_view.clone()),
    })
}

/// A served version's Deployment and pods, as the plan judges its availability.
async fn version_pods(
    ctx: &Context,
    stores: &Stores,
    namespace: &str,
    name: &str,
    version: &str,
) -> Result<health::VersionPods, Error> {
    workload_pods(
        ctx,
        stores,
        namespace,
        &traffic::workload_name(name, version),
        &format!("{LABEL_ROLLOUT}={name},{LABEL_VERSION}={version},{LABEL_ROLE}=serve"),
    )
    .await
}

/// The traffic log sink's Deployment and pods.
async fn traffic_log_pods(
    ctx: &Context,
    stores: &Stores,
    namespace: &str,
    name: &str,
) -> Result<health::VersionPods, Error> {
    workload_pods(
        ctx,
        stores,
        namespace,
        &traffic_log::deployment_name(name),
        &format!("{LABEL_ROLLOUT}={name},{LABEL_ROLE}={}", traffic_log::ROLE),
    )
    .await
}

/// A Deployment from the cache and its pods (listed: pods are not cached), as the plan judges availability.
async fn workload_pods(
    ctx: &Context,
    stores: &Stores,
    namespace: &str,
    deployment: &str,
    pod_selector: &str,
) -> Result<health::VersionPods, Error> {
    let deployment = stores
        .deployments
        .get(&ObjectRef::<Deployment>::new(deployment).within(namespace));
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let pods = pods
        .list(&ListParams::default().labels(pod_selector))
        .await?
        .items;
    Ok(health::observe(deployment.as_deref(), &pods))
}

/// The running router pods of a rollout: (name, IP).
async fn router_pods(ctx: &Context, namespace: &str, name: &str) -> Vec<(String, String)> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let selector =
        ListParams::default().labels(&format!("{LABEL_ROLLOUT}={name},{LABEL_ROLE}=router"));
    let Ok(list) = pods.list(&selector).await else {
        return Vec::new();
    };
    list.items
        .into_iter()
        .filter_map(|pod| {
            let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone())?;
            Some((pod.name_any(), ip))
        })
        .collect()
}

/// Router pods whose live route table is not `table` (one that does not answer is not counted: it reloads
/// the ConfigMap when it comes back).
async fn drifted_routers(
    routers: &[(String, String)],
    table: &Value,
    token: &Token,
) -> Vec<String> {
    let checks = routers.iter().map(|(pod, ip)| async move {
        let live = tokio::time::timeout(
            PUSH_TIMEOUT,
            admin_call(ip, hyper::Method::GET, String::new(), token),
        )
        .await;
        match live {
            Ok(Ok(live)) if !traffic::same_routes(&live, table) => Some(pod.clone()),
            _ => None,
        }
    });
    futures::future::join_all(checks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// Sends the route table to every running router pod's admin endpoint (best effort: the ConfigMap is the
/// durable copy every router also reloads).
async fn push_routes(routers: &[(String, String)], table: &Value, token: &Token) {
    let body = table.to_string();
    let pushes = routers.iter().map(|(_, ip)| {
        let body = body.clone();
        async move {
            let result = tokio::time::timeout(
                PUSH_TIMEOUT,
                admin_call(ip, hyper::Method::PUT, body, token),
            )
            .await;
            if !matches!(result, Ok(Ok(_))) {
                warn!(
                    pod_ip = ip,
                    "router did not take the new routes; it reloads them from the ConfigMap"
                );
            }
        }
    });
    futures::future::join_all(pushes).await;
}

/// Largest route table read back from a router.
const MAX_ROUTES_BYTES: usize = 64 << 10;

/// A call to a router's `/admin/routes` with the admin token; the JSON answer of a 2xx.
async fn admin_call(
    ip: &str,
    method: hyper::Method,
    body: String,
    token: &Token,
) -> Result<Value, Box<dyn std::error::Error + Send + Sync>> {
    use http_body_util::{BodyExt, Full, Limited};
    use hyper::body::Bytes;
    let authority = format!("{ip}:{}", traffic::ADMIN_PORT);
    let stream = tokio::net::TcpStream::connect(&authority).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = hyper::Request::builder()
        .method(method)
        .uri("/admin/routes")
        .header(hyper::header::HOST, authority)
        .header(hyper::header::AUTHORIZATION, token.bearer())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))?;
    let response = sender.send_request(request).await?;
    if !response.status().is_success() {
        return Err(format!("status {}", response.status()).into());
    }
    let bytes = Limited::new(response.into_body(), MAX_ROUTES_BYTES)
        .collect()
        .await?
        .to_bytes();
    Ok(serde_json::from_slice(&bytes)?)
}

pub async fn run(ctx: Arc<Context>, stop: impl Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let (versions, version_events) = cached_watch(
        Api::<ModelVersion>::all(client.clone()),
        watcher::Config::default(),
    );
    let version_events = version_events.touched_objects();
    // Cached without managedFields: with server-side apply they are most of an object's size.
    let (rollouts, rollout_events) = cached_watch(
        Api::<Rollout>::all(client.clone()),
        watcher::Config::default(),
    );
    let rollout_events = rollout_events.applied_objects();
    // Only the workloads of rollouts are cached: the sweep's view of what each rollout owns.
    let labelled = watcher::Config::default().labels(LABEL_ROLLOUT);
    let (deployments, deployment_events) =
        cached_watch(Api::<Deployment>::all(client.clone()), labelled.clone());
    let deployment_events = deployment_events.touched_objects();
    let (services, service_events) = cached_watch(Api::<Service>::all(client.clone()), labelled);
    let service_events = service_events.touched_objects();
    let stores = Arc::new(Stores {
        versions,
        deployments,
        services,
    });
    let controller = Controller::for_stream(rollout_events, rollouts.clone());
    let wakeups = ctx.alerts.take_wakeups();
    let woken = futures::stream::unfold(wakeups, |receiver| async move {
        let mut receiver = receiver?;
        let key = receiver.recv().await?;
        Some((key, Some(receiver)))
    })
    .map(|(namespace, name)| ObjectRef::<Rollout>::new(&name).within(&namespace));
    let controller = controller
        .watches_stream(version_events, move |version: ModelVersion| {
            watch::rollouts_waiting_for(&rollouts.state(), &version)
        })
        .watches_stream(deployment_events, |deployment: Deployment| {
            watch::owning_rollout(&deployment)
        })
        .watches_stream(service_events, |service: Service| {
            watch::owning_rollout(&service)
        })
        .reconcile_on(woken);
    run_controller_with(KIND, controller, ctx, stop, move |rollout, ctx| {
        reconcile(rollout, ctx, stores.clone())
    })
    .await;
}
