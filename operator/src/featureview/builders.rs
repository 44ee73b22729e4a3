//! The objects a FeatureView owns: a materialization Job per run and the streaming ingestion Deployment, and
//! the view as the data-plane processes read it.

use flywheel_crds::FeatureView;
use flywheel_crds::featureview::Materialization;
use jiff::Timestamp;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::batch::v1::Job;
use serde_json::{Value, json};

use super::{KIND, LABEL_VIEW};
use crate::config::{ServingSettings, TrainerSettings};
use crate::objects::{owner, security};
use crate::store_access::PodAccess;

/// The view as the data-plane processes read it (FLYWHEEL_FEATURE_VIEW).
pub fn view_json(view: &FeatureView) -> String {
    json!({
        "apiVersion": "flywheel.dev/v1alpha1",
        "kind": KIND,
        "metadata": {"name": view.metadata.name, "namespace": view.metadata.namespace},
        "spec": view.spec,
    })
    .to_string()
}

fn common_env(view: &FeatureView) -> Vec<Value> {
    let mut env = vec![json!({"name": "FLYWHEEL_FEATURE_VIEW", "value": view_json(view)})];
    if let Some(secret) = view
        .spec
        .online
        .as_ref()
        .and_then(|o| o.redis.password_secret.as_ref())
    {
        env.push(json!({"name": "FLYWHEEL_REDIS_PASSWORD",
                        "valueFrom": {"secretKeyRef": {"name": secret, "key": "password"}}}));
    }
    env
}

/// TLS toward the view's online store, when it asks for it.
fn redis_access(view: &FeatureView) -> PodAccess {
    PodAccess::redis(view.spec.online.as_ref().and_then(|o| o.redis.tls.as_ref()))
}

/// How long one materialization run may take, in seconds (`spec.materialization.timeout`, default 30m).
fn run_deadline_seconds(view: &FeatureView) -> u64 {
    let timeout = view.spec.materialization.as_ref().map_or_else(
        || flywheel_crds::common::Duration::from(Materialization::DEFAULT_TIMEOUT),
        Materialization::timeout,
    );
    timeout
        .parse()
        .map_or(30 * 60, |timeout| timeout.as_secs().max(1))
}

/// The materialization Job of one scheduled run.
pub fn materialization_job(
    view: &FeatureView,
    name: &str,
    scheduled: Timestamp,
    settings: &TrainerSettings,
) -> Result<Job, serde_json::Error> {
    let view_name = view.metadata.name.clone().unwrap_or_default();
    let mut env = common_env(view);
    env.push(json!({"name": "FLYWHEEL_TERMINATION_LOG", "value": "/dev/termination-log"}));
    if let Some(watermark) = view
        .status
        .as_ref()
        .and_then(|s| s.last_materialization.as_ref())
        .and_then(|r| r.watermark.clone())
    {
        env.push(json!({"name": "FLYWHEEL_SINCE", "value": watermark}));
    }
    let (mut volumes, mut mounts) = match &settings.storage_claim {
        Some(claim) => (
            json!([{"name": "storage", "persistentVolumeClaim": {"claimName": claim}}]),
            json!([{"name": "storage", "mountPath": settings.storage_path}]),
        ),
        None => (json!([]), json!([])),
    };
    redis_access(view).add_to(&mut env, &mut volumes, &mut mounts);
    let labels = json!({LABEL_VIEW: view_name, "app.kubernetes.io/managed-by": "flywheel"});
    serde_json::from_value(json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": view.metadata.namespace,
            "labels": labels,
            "annotations": {"flywheel.dev/scheduled-time": scheduled.to_string()},
            "ownerReferences": [owner(view)],
        },
        "spec": {
            "backoffLimit": 2,
            // A hung store must not hold the schedule: the whole run, retries included, is bounded.
            "activeDeadlineSeconds": run_deadline_seconds(view),
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "serviceAccountName": settings.service_account,
                    "volumes": volumes,
                    "containers": [{
                        "name": "materialize",
                        "image": settings.image,
                        "args": ["materialize"],
                        "env": env,
                        "volumeMounts": mounts,
                        "terminationMessagePolicy": "FallbackToLogsOnError",
                        "securityContext": security(),
                    }],
                },
            },
        },
    }))
}

pub fn ingest_name(view: &str) -> String {
    format!("{view}-ingest")
}

/// The streaming ingestion Deployment (one replica: one consumer group member per partition needs no more for
/// most topics; scale it for partitions).
pub fn ingest_deployment(
    view: &FeatureView,
    settings: &ServingSettings,
) -> Result<Deployment, serde_json::Error> {
    let view_name = view.metadata.name.clone().unwrap_or_default();
    let labels = json!({LABEL_VIEW: view_name, "app.kubernetes.io/component": "ingest"});
    let (mut env, mut volumes, mut mounts) = (common_env(view), json!([]), json!([]));
    let kafka = view
        .spec
        .source
        .stream
        .as_ref()
        .and_then(|s| s.security.as_ref());
    PodAccess::kafka(kafka)
        .and(redis_access(view))
        .add_to(&mut env, &mut volumes, &mut mounts);
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": ingest_name(&view_name),
            "namespace": view.metadata.namespace,
            "labels": labels,
            "ownerReferences": [owner(view)],
        },
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "volumes": volumes,
                    "containers": [{
                        "name": "ingest",
                        "image": settings.image,
                        "args": ["ingest"],
                        "env": env,
                        "volumeMounts": mounts,
                        "ports": [{"name": "metrics", "containerPort": 8082, "protocol": "TCP"}],
                        "livenessProbe": {"httpGet": {"path": "/healthz", "port": "metrics"}},
                        "securityContext": security(),
                    }],
                },
            },
        },
    }))
}
