//! Rollout controller: observe (the target ModelVersion from a cache, firing alerts, an analysis round against
//! Prometheus when one is due), plan (`plan.rs`, pure), apply: the serving workloads and the router's route
//! table first, so status never claims a weight that is not in force, then status and Events. An abort also
//! pushes the new route table to every router pod at once, not waiting for the mounted ConfigMap to refresh.

pub mod health;
pub mod online;
pub mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use flywheel_auth::{ADMIN_TOKEN_KEY, FEEDBACK_TOKEN_KEY, Token};
use flywheel_crds::rollout::{RolloutPhase, RolloutStatus};
use flywheel_crds::{FeatureView, ModelVersion, Rollout};
use futures::StreamExt;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{Controller, WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use tracing::warn;

use crate::analysis::{self, QueryContext, QueryResult};
use crate::controller::{
    Context, ERROR_REQUEUE, Error, FIELD_MANAGER, apply_plan, strip_managed_fields,
};
use crate::credentials::{self, Tokens};
use crate::prometheus::Access;
use crate::traffic::{self, LABEL_ROLE, LABEL_ROLLOUT, LABEL_VERSION};
use online::OnlineView;

pub const KIND: &str = "Rollout";
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
const PUSH_TIMEOUT: Duration = Duration::from_secs(1);

fn canary_live(status: &RolloutStatus) -> bool {
    status.canary_version.is_some()
        && matches!(
            status.phase,
            Some(RolloutPhase::Progressing | RolloutPhase::Paused)
        )
}

/// The versions taking traffic, with weights, for a status.
fn split_of(status: &RolloutStatus) -> Option<Vec<(String, u32)>> {
    let stable = status.stable_version.as_deref()?;
    let canary = status
        .canary_version
        .as_deref()
        .filter(|_| canary_live(status))
        .map(|canary| (canary, status.canary_weight));
    Some(traffic::split(canary, stable))
}

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

pub async fn reconcile(
    rollout: Arc<Rollout>,
    ctx: Arc<Context>,
    versions: Store<ModelVersion>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started(KIND);
    let namespace = rollout.namespace().unwrap_or_default();
    let name = rollout.name_any();
    let version =
        |version: &str| versions.get(&ObjectRef::<ModelVersion>::new(version).within(&namespace));
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
        Some(traffic::owner(rollout.as_ref())),
        json!({LABEL_ROLLOUT: name, LABEL_ROLE: "credentials"}),
        &[ADMIN_TOKEN_KEY, FEEDBACK_TOKEN_KEY],
    )
    .await?;
    let admin_token = tokens
        .get(ADMIN_TOKEN_KEY)
        .ok_or_else(|| Error::Credentials(format!("no {ADMIN_TOKEN_KEY}")))?;
    let before = split_of(&status);
    // Listed once: read back for drift now, sent the new table after planning.
    let routers = match &rollout.spec.traffic.router {
        Some(_) => router_pods(&ctx, &namespace, &name).await,
        None => Vec::new(),
    };
    let drifted_routers = match &before {
        Some(split) => {
            let table = traffic::route_table(&name, &namespace, split);
            drifted_routers(&routers, &table, admin_token).await
        }
        None => Vec::new(),
    };
    let canary_pods = match status.canary_version.as_deref() {
        Some(canary) if canary_live(&status) => {
            Some(version_pods(&ctx, &namespace, &name, canary).await?)
        }
        _ => None,
    };
    let stable_pods = match status.stable_version.as_deref() {
        Some(stable) => Some(version_pods(&ctx, &namespace, &name, stable).await?),
        None => None,
    };
    let planned = plan::plan(&plan::Observed {
        rollout: &rollout,
        target: target.as_deref(),
        analysis,
        firing,
        online: online.clone(),
        drifted_routers,
        canary_pods,
        stable_pods,
        now,
    });
    let after = split_of(&planned.plan.status);
    if let Some(split) = &after {
        let mut served: BTreeSet<String> = split.iter().map(|(v, _)| v.clone()).collect();
        // A canary keeps its pods while it is live, even before its first weight.
        if let Some(canary) = planned
            .plan
            .status
            .canary_version
            .as_ref()
            .filter(|_| canary_live(&planned.plan.status))
        {
            served.insert(canary.clone());
        }
        let found: BTreeMap<String, ModelVersion> = served
            .iter()
            .filter_map(|v| version(v).map(|mv| (v.clone(), mv.as_ref().clone())))
            .collect();
        let table = traffic::route_table(&name, &namespace, split);
        if planned.aborted.is_some() || planned.restore_routes || before.as_ref() != Some(split) {
            push_routes(&routers, &table, admin_token).await;
        }
        let online_env = match &online {
            OnlineView::Found(view) => online::environment(&rollout, view),
            _ => None,
        };
        apply_workloads(
            &ctx,
            &rollout,
            &namespace,
            &found,
            &table,
            online_env.as_deref(),
            &tokens,
        )
        .await?;
        let versions_before: BTreeSet<&String> = [
            status.stable_version.as_ref(),
            status.canary_version.as_ref(),
        ]
        .into_iter()
        .flatten()
        .collect();
        let versions_after: BTreeSet<&String> = [
            planned.plan.status.stable_version.as_ref(),
            planned
                .plan
                .status
                .canary_version
                .as_ref()
                .filter(|_| canary_live(&planned.plan.status)),
        ]
        .into_iter()
        .flatten()
        .collect();
        if rollout.status.is_none() || versions_before != versions_after {
            remove_unserved(&ctx, &namespace, &name, &served).await?;
        }
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

async fn apply_workloads(
    ctx: &Context,
    rollout: &Rollout,
    namespace: &str,
    versions: &BTreeMap<String, ModelVersion>,
    table: &Value,
    online: Option<&[Value]>,
    tokens: &Tokens,
) -> Result<(), Error> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let digest = tokens.digest();
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), namespace);
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let routes = traffic::routes_config_map(rollout, table)?;
    config_maps
        .patch(&routes.name_any(), &params, &Patch::Apply(&routes))
        .await?;
    for version in versions.values() {
        let deployment =
            traffic::version_deployment(rollout, version, &ctx.serving, online, &digest)?;
        deployments
            .patch(&deployment.name_any(), &params, &Patch::Apply(&deployment))
            .await?;
        let service = traffic::version_service(rollout, &version.name_any())?;
        services
            .patch(&service.name_any(), &params, &Patch::Apply(&service))
            .await?;
    }
    if rollout.spec.traffic.router.is_some() {
        let (router, service) = traffic::router(rollout, &ctx.serving, &digest)?;
        deployments
            .patch(&router.name_any(), &params, &Patch::Apply(&router))
            .await?;
        services
            .patch(&service.name_any(), &params, &Patch::Apply(&service))
            .await?;
    }
    Ok(())
}

/// Deletes the Deployments and Services of versions this rollout no longer serves (a promoted rollout's old
/// stable, an aborted canary).
async fn remove_unserved(
    ctx: &Context,
    namespace: &str,
    name: &str,
    served: &BTreeSet<String>,
) -> Result<(), Error> {
    let selector = ListParams::default().labels(&format!("{LABEL_ROLLOUT}={name},{LABEL_VERSION}"));
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    for deployment in deployments.list(&selector).await? {
        if !served.contains(
            deployment
                .labels()
                .get(LABEL_VERSION)
                .map_or("", String::as_str),
        ) {
            ignore_missing(
                deployments
                    .delete(&deployment.name_any(), &DeleteParams::default())
                    .await,
            )?;
        }
    }
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), namespace);
    for service in services.list(&selector).await? {
        if !served.contains(
            service
                .labels()
                .get(LABEL_VERSION)
                .map_or("", String::as_str),
        ) {
            ignore_missing(
                services
                    .delete(&service.name_any(), &DeleteParams::default())
                    .await,
            )?;
        }
    }
    Ok(())
}

fn ignore_missing<T>(result: Result<T, kube::Error>) -> Result<(), Error> {
    match result {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(err) => Err(err.into()),
    }
}

/// A served version's Deployment and pods, as the plan judges its availability.
async fn version_pods(
    ctx: &Context,
    namespace: &str,
    name: &str,
    version: &str,
) -> Result<health::VersionPods, Error> {
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), namespace);
    let deployment = deployments
        .get_opt(&traffic::workload_name(name, version))
        .await?;
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let selector = ListParams::default().labels(&format!(
        "{LABEL_ROLLOUT}={name},{LABEL_VERSION}={version},{LABEL_ROLE}=serve"
    ));
    let pods = pods.list(&selector).await?.items;
    Ok(health::observe(deployment.as_ref(), &pods))
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
    let (versions, versions_writer) = reflector::store();
    let version_events = watcher(
        Api::<ModelVersion>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .modify(strip_managed_fields)
    .reflect(versions_writer)
    .touched_objects();
    // Cached without managedFields: with server-side apply they are most of an object's size.
    let (rollouts, rollouts_writer) = reflector::store();
    let rollout_events = watcher(Api::<Rollout>::all(client), watcher::Config::default())
        .default_backoff()
        .modify(strip_managed_fields)
        .reflect(rollouts_writer)
        .applied_objects();
    let controller = Controller::for_stream(rollout_events, rollouts.clone());
    let wakeups = ctx.alerts.take_wakeups();
    let woken = futures::stream::unfold(wakeups, |receiver| async move {
        let mut receiver = receiver?;
        let key = receiver.recv().await?;
        Some((key, Some(receiver)))
    })
    .map(|(namespace, name)| ObjectRef::<Rollout>::new(&name).within(&namespace));
    controller
        .watches_stream(version_events, move |version: ModelVersion| {
            let namespace = version.namespace();
            let name = version.name_any();
            rollouts
                .state()
                .into_iter()
                .filter(|rollout| rollout.namespace() == namespace)
                // Only Rollouts waiting for this version (to be Validated, or to exist) care about its
                // changes; the versions they already serve change status with every Rollout that serves
                // them, and mapping those would re-reconcile every Rollout on each.
                .filter(|rollout| {
                    let status = rollout.status.clone().unwrap_or_default();
                    rollout.spec.model_version == name
                        && status.stable_version.as_deref() != Some(name.as_str())
                        && status.canary_version.as_deref() != Some(name.as_str())
                })
                .map(|rollout| ObjectRef::from_obj(rollout.as_ref()))
                .collect::<Vec<_>>()
        })
        .reconcile_on(woken)
        .with_config(crate::controller::controller_config())
        .graceful_shutdown_on(stop)
        .run(
            move |rollout, ctx| reconcile(rollout, ctx, versions.clone()),
            |rollout: Arc<Rollout>, error: &Error, ctx: Arc<Context>| {
                ctx.metrics.reconcile_failed(KIND, error.label());
                warn!(kind = KIND, name = %rollout.name_any(), namespace = rollout.namespace(), error = %error, "reconcile failed");
                Action::requeue(ERROR_REQUEUE)
            },
            ctx,
        )
        .for_each(|result| async move {
            if let Err(err) = result {
                warn!(kind = KIND, error = %err, "controller error");
            }
        })
        .await;
}
