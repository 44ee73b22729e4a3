//! The serving workloads of a Rollout and its traffic split, pure: one Deployment and Service of
//! `flywheel-serving serve` per served ModelVersion, and the built-in router (`flywheel-serving route`) behind
//! the Service named after the Rollout, whose route table (a ConfigMap) carries the weights. Canary first, so
//! its sticky bucket range only grows.

use flywheel_auth::{ADMIN_TOKEN_KEY, CREDENTIALS_DIR, FEEDBACK_TOKEN_KEY};
use flywheel_crds::{ModelVersion, Rollout};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Service};
use serde_json::{Value, json};
use xxhash_rust::xxh3::xxh3_64;

use crate::config::ServingSettings;
use crate::objects::{owner, security};
use crate::store_access::PodAccess;

pub const LABEL_ROLLOUT: &str = "flywheel.dev/rollout";
pub const LABEL_VERSION: &str = "flywheel.dev/model-version";
pub const LABEL_ROLE: &str = "flywheel.dev/role";
pub const HTTP_PORT: i32 = 8080;
pub const GRPC_PORT: i32 = 8081;
pub const ADMIN_PORT: i32 = 8082;
const ROUTES_FILE: &str = "routes.json";
/// Pod-template annotation with a digest of the mounted tokens: a rotated Secret rolls the pods.
pub const CREDENTIALS_DIGEST_ANNOTATION: &str = "flywheel.dev/credentials-digest";

/// The served versions and their weights, in bucket order (canary first).
pub fn split(canary: Option<(&str, u32)>, stable: &str) -> Vec<(String, u32)> {
    match canary {
        Some((canary, weight)) if weight >= 100 => vec![(canary.to_owned(), 100)],
        Some((canary, weight)) if weight > 0 => vec![
            (canary.to_owned(), weight),
            (stable.to_owned(), 100 - weight),
        ],
        _ => vec![(stable.to_owned(), 100)],
    }
}

/// A DNS-label name `<rollout>-<version>`, shortened with a hash when too long.
pub fn workload_name(rollout: &str, version: &str) -> String {
    let name = format!("{rollout}-{version}");
    if name.len() <= 63 {
        return name;
    }
    let hash = format!("{:08x}", xxh3_64(name.as_bytes()) as u32);
    let keep = 63 - hash.len() - 1;
    format!("{}-{hash}", name[..keep].trim_end_matches('-'))
}

/// The router's route table for `split`.
pub fn route_table(rollout: &str, namespace: &str, split: &[(String, u32)]) -> Value {
    let backends: Vec<Value> = split
        .iter()
        .map(|(version, weight)| {
            let host = format!("{}.{namespace}.svc", workload_name(rollout, version));
            json!({
                "name": version,
                "http": format!("http://{host}:{HTTP_PORT}"),
                "grpc": format!("http://{host}:{GRPC_PORT}"),
                "weight": weight,
            })
        })
        .collect();
    json!({ "backends": backends })
}

fn push(list: &mut Value, item: Value) {
    if let Some(items) = list.as_array_mut() {
        items.push(item);
    }
}

fn storage(settings: &ServingSettings) -> (Value, Value) {
    match &settings.storage_claim {
        Some(claim) => (
            json!([{"name": "storage", "persistentVolumeClaim": {"claimName": claim, "readOnly": true}}]),
            json!([{"name": "storage", "mountPath": settings.storage_path, "readOnly": true}]),
        ),
        None => (json!([]), json!([])),
    }
}

/// The Secret holding a Rollout's admin token (operator → router and servers) and feedback token (the
/// application that sends labels → servers).
pub fn credentials_name(rollout: &str) -> String {
    workload_name(rollout, "credentials")
}

/// The volume of the Rollout's Secret with only `keys`, and its read-only mount.
fn credentials_volume(rollout: &str, keys: &[&str]) -> (Value, Value) {
    let items: Vec<Value> = keys
        .iter()
        .map(|key| json!({"key": key, "path": key}))
        .collect();
    (
        json!({"name": "credentials", "secret": {"secretName": credentials_name(rollout), "items": items}}),
        json!({"name": "credentials", "mountPath": CREDENTIALS_DIR, "readOnly": true}),
    )
}

fn credential_file(key: &str) -> String {
    format!("{CREDENTIALS_DIR}/{key}")
}

/// Whether a router's live route table (as it reports it) is `desired`: same backends in the same order with
/// the same URLs and weights, and no mirror `desired` lacks.
pub fn same_routes(live: &Value, desired: &Value) -> bool {
    let backends = |table: &Value| -> Option<Vec<(String, String, String, f64)>> {
        table["backends"]
            .as_array()?
            .iter()
            .map(|backend| {
                let text = |field: &str| backend[field].as_str().unwrap_or_default().to_owned();
                Some((
                    text("name"),
                    text("http"),
                    text("grpc"),
                    backend["weight"].as_f64()?,
                ))
            })
            .collect()
    };
    let mirror = |table: &Value| table.get("mirror").filter(|m| !m.is_null()).cloned();
    backends(live).is_some()
        && backends(live) == backends(desired)
        && mirror(live) == mirror(desired)
}

/// The path of a `file://` artifact URI (the serving pods see the same volume as the trainer).
pub fn artifact_path(uri: &str) -> &str {
    uri.strip_prefix("file://").unwrap_or(uri)
}

/// The Deployment serving one ModelVersion.
pub fn version_deployment(
    rollout: &Rollout,
    version: &ModelVersion,
    settings: &ServingSettings,
    online: Option<&PodAccess>,
    credentials_digest: &str,
) -> Result<Deployment, serde_json::Error> {
    let name = rollout.metadata.name.clone().unwrap_or_default();
    let version_name = version.metadata.name.clone().unwrap_or_default();
    let labels = json!({LABEL_ROLLOUT: name, LABEL_VERSION: version_name, LABEL_ROLE: "serve"});
    let image = rollout
        .spec
        .serving
        .image
        .clone()
        .unwrap_or_else(|| settings.image.clone());
    let (mut volumes, mut mounts) = storage(settings);
    let (volume, mount) = credentials_volume(&name, &[ADMIN_TOKEN_KEY, FEEDBACK_TOKEN_KEY]);
    push(&mut volumes, volume);
    push(&mut mounts, mount);
    let mut env: Vec<Value> = Vec::new();
    if let Some(online) = online {
        online.add_to(&mut env, &mut volumes, &mut mounts);
    }
    if let Some(feedback) = &rollout.spec.feedback {
        PodAccess::kafka(feedback.security.as_ref()).add_to(&mut env, &mut volumes, &mut mounts);
        // Each pod's consumer group is its own (the server defaults it to the pod's hostname).
        env.push(json!({"name": "FLYWHEEL_KAFKA_BROKERS", "value": feedback.brokers.join(",")}));
        if let Some(topic) = &feedback.clicks_topic {
            env.push(json!({"name": "FLYWHEEL_CLICKS_TOPIC", "value": topic}));
        }
        if let Some(topic) = &feedback.prediction_log_topic {
            env.push(json!({"name": "FLYWHEEL_PREDICTION_LOG_TOPIC", "value": topic}));
        }
    }
    let mut container = json!({
        "name": "serve",
        "image": image,
        "args": [
            "serve",
            "--model-name", name,
            "--model-version", version_name,
            "--model-uri", artifact_path(&version.spec.artifact.uri),
            "--model-sha256", version.spec.artifact.sha256,
            "--feature-schema-hash", version.spec.feature_schema_hash,
            "--max-request-rows", rollout.spec.serving.max_batch_size.to_string(),
            "--admin-token-file", credential_file(ADMIN_TOKEN_KEY),
            "--feedback-token-file", credential_file(FEEDBACK_TOKEN_KEY),
        ],
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
        ],
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT}, "periodSeconds": 2},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": HTTP_PORT}, "periodSeconds": 10},
        "securityContext": security(),
        "volumeMounts": mounts,
    });
    if let Some(resources) = &rollout.spec.serving.resources {
        container["resources"] = serde_json::to_value(resources)?;
    }
    if !env.is_empty() {
        container["env"] = json!(env);
    }
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": workload_name(&name, &version_name),
            "labels": labels,
            "ownerReferences": [owner(rollout)],
        },
        "spec": {
            "replicas": rollout.spec.serving.replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": ADMIN_PORT.to_string(),
                        CREDENTIALS_DIGEST_ANNOTATION: credentials_digest,
                    },
                },
                "spec": {
                    "automountServiceAccountToken": false,
                    "containers": [container],
                    "volumes": volumes,
                },
            },
        },
    }))
}

/// The Service in front of one version's pods (the router's backend).
pub fn version_service(rollout: &Rollout, version: &str) -> Result<Service, serde_json::Error> {
    let name = rollout.metadata.name.clone().unwrap_or_default();
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": workload_name(&name, version),
            "labels": {LABEL_ROLLOUT: name, LABEL_VERSION: version},
            "ownerReferences": [owner(rollout)],
        },
        "spec": {
            "selector": {LABEL_ROLLOUT: name, LABEL_VERSION: version, LABEL_ROLE: "serve"},
            "ports": [
                {"name": "http", "port": HTTP_PORT, "targetPort": HTTP_PORT, "protocol": "TCP"},
                {"name": "grpc", "port": GRPC_PORT, "targetPort": GRPC_PORT, "protocol": "TCP"},
                {"name": "admin", "port": ADMIN_PORT, "targetPort": ADMIN_PORT, "protocol": "TCP"},
            ],
        },
    }))
}

pub fn routes_name(rollout: &str) -> String {
    workload_name(rollout, "routes")
}

/// The router's route table as a ConfigMap (mounted by the router, which reloads it when it changes).
pub fn routes_config_map(rollout: &Rollout, table: &Value) -> Result<ConfigMap, serde_json::Error> {
    let name = rollout.metadata.name.clone().unwrap_or_default();
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": routes_name(&name),
            "labels": {LABEL_ROLLOUT: name, LABEL_ROLE: "routes"},
            "ownerReferences": [owner(rollout)],
        },
        "data": {ROUTES_FILE: table.to_string()},
    }))
}

/// The router Deployment and the Service clients call (named after the Rollout).
pub fn router(
    rollout: &Rollout,
    settings: &ServingSettings,
    credentials_digest: &str,
) -> Result<(Deployment, Service), serde_json::Error> {
    let name = rollout.metadata.name.clone().unwrap_or_default();
    let (credentials, credentials_mount) = credentials_volume(&name, &[ADMIN_TOKEN_KEY]);
    let labels = json!({LABEL_ROLLOUT: name, LABEL_ROLE: "router"});
    let router = rollout.spec.traffic.router.clone().unwrap_or_default();
    let image = rollout
        .spec
        .serving
        .image
        .clone()
        .unwrap_or_else(|| settings.image.clone());
    let deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": workload_name(&name, "router"),
            "labels": labels,
            "ownerReferences": [owner(rollout)],
        },
        "spec": {
            "replicas": router.replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": ADMIN_PORT.to_string(),
                        CREDENTIALS_DIGEST_ANNOTATION: credentials_digest,
                    },
                },
                "spec": {
                    "automountServiceAccountToken": false,
                    "containers": [{
                        "name": "route",
                        "image": image,
                        "args": [
                            "route",
                            "--config", format!("/etc/flywheel/{ROUTES_FILE}"),
                            "--sticky-header", router.sticky_header,
                            "--model-name", name,
                            "--admin-token-file", credential_file(ADMIN_TOKEN_KEY),
                        ],
                        "ports": [
                            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
                            {"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
                        ],
                        "securityContext": security(),
                        "volumeMounts": [
                            {"name": "routes", "mountPath": "/etc/flywheel", "readOnly": true},
                            credentials_mount,
                        ],
                    }],
                    "volumes": [{"name": "routes", "configMap": {"name": routes_name(&name)}}, credentials],
                },
            },
        },
    }))?;
    let service = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "labels": {LABEL_ROLLOUT: name},
            "ownerReferences": [owner(rollout)],
        },
        "spec": {
            "selector": labels,
            "ports": [
                {"name": "http", "port": HTTP_PORT, "targetPort": HTTP_PORT, "protocol": "TCP"},
                {"name": "grpc", "port": GRPC_PORT, "targetPort": HTTP_PORT, "protocol": "TCP"},
            ],
        },
    }))?;
    Ok((deployment, service))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_canary_comes_first_and_weights_add_up() {
        assert_eq!(
            split(Some(("v2", 5)), "v1"),
            vec![("v2".into(), 5), ("v1".into(), 95)]
        );
        assert_eq!(split(Some(("v2", 0)), "v1"), vec![("v1".into(), 100)]);
        assert_eq!(split(Some(("v2", 100)), "v1"), vec![("v2".into(), 100)]);
        assert_eq!(split(None, "v1"), vec![("v1".into(), 100)]);
        let table = route_table("ctr", "ml", &split(Some(("v2", 20)), "v1"));
        assert_eq!(table["backends"][0]["http"], "http://ctr-v2.ml.svc:8080");
        assert_eq!(table["backends"][1]["weight"], 80);
    }

    #[test]
    fn every_serving_replica_gets_the_feedback_topics() -> Result<(), serde_json::Error> {
        use crate::plan::examples::load;
        let mut rollout: Rollout = load("rollout.yaml", 1);
        let version: ModelVersion = load("modelversion.yaml", 1);
        let settings = ServingSettings {
            image: "serving".into(),
            traffic_log_image: "flywheel-trainer:test".into(),
            storage_claim: None,
            storage_path: "/var/lib/flywheel".into(),
        };
        let env_of = |deployment: &Deployment| -> Vec<(String, String)> {
            deployment
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .and_then(|s| s.containers[0].env.clone())
                .unwrap_or_default()
                .into_iter()
                .filter_map(|v| Some((v.name, v.value?)))
                .collect()
        };
        assert!(
            env_of(&version_deployment(
                &rollout, &version, &settings, None, "d"
            )?)
            .is_empty()
        );
        rollout.spec.feedback = Some(flywheel_crds::rollout::Feedback {
            brokers: vec!["kafka-0:9092".into(), "kafka-1:9092".into()],
            clicks_topic: Some("clicks".into()),
            prediction_log_topic: None,
            traffic_log: None,
            security: None,
        });
        assert_eq!(
            env_of(&version_deployment(
                &rollout, &version, &settings, None, "d"
            )?),
            [
                (
                    "FLYWHEEL_KAFKA_BROKERS".to_owned(),
                    "kafka-0:9092,kafka-1:9092".to_owned()
                ),
                ("FLYWHEEL_CLICKS_TOPIC".to_owned(), "clicks".to_owned()),
            ]
        );
        Ok(())
    }

    #[test]
    fn serving_pods_reach_a_secured_kafka_with_the_users_secrets() -> anyhow::Result<()> {
        use flywheel_crds::store_access::{ClientTls, KafkaSasl, KafkaSecurity, SaslMechanism};
        let mut rollout: Rollout = crate::plan::examples::load("rollout.yaml", 1);
        let version: ModelVersion = crate::plan::examples::load("modelversion.yaml", 1);
        rollout.spec.feedback = Some(flywheel_crds::rollout::Feedback {
            brokers: vec!["kafka:9093".into()],
            clicks_topic: Some("clicks".into()),
            prediction_log_topic: None,
            traffic_log: None,
            security: Some(KafkaSecurity {
                tls: Some(ClientTls {
                    ca_secret: Some("kafka-ca".into()),
                }),
                sasl: Some(KafkaSasl {
                    mechanism: SaslMechanism::ScramSha256,
                    credentials_secret: "kafka-user".into(),
                }),
            }),
        });
        let settings = ServingSettings {
            image: "serving".into(),
            traffic_log_image: "flywheel-trainer:test".into(),
            storage_claim: None,
            storage_path: "/var/lib/flywheel".into(),
        };
        let pod = serde_json::to_value(version_deployment(
            &rollout, &version, &settings, None, "d",
        )?)?["spec"]["template"]["spec"]
            .clone();
        let env = &pod["containers"][0]["env"];
        let find = |name: &str| {
            env.as_array()
                .and_then(|env| env.iter().find(|v| v["name"] == name))
                .cloned()
                .unwrap_or_default()
        };
        assert_eq!(find("FLYWHEEL_KAFKA_TLS")["value"], "true");
        assert_eq!(
            find("FLYWHEEL_KAFKA_SASL_MECHANISM")["value"],
            "SCRAM-SHA-256"
        );
        assert_eq!(
            find("FLYWHEEL_KAFKA_SASL_PASSWORD")["valueFrom"]["secretKeyRef"]["name"],
            "kafka-user"
        );
        let ca_file = find("FLYWHEEL_KAFKA_CA_FILE")["value"].clone();
        let mounted = pod["containers"][0]["volumeMounts"]
            .as_array()
            .and_then(|mounts| mounts.iter().find(|m| m["name"] == "kafka-ca"))
            .cloned()
            .unwrap_or_default();
        assert!(
            ca_file
                .as_str()
                .is_some_and(|file| file.starts_with(mounted["mountPath"].as_str().unwrap_or("-"))),
            "{ca_file} under {mounted}"
        );
        assert!(
            pod["volumes"]
                .as_array()
                .is_some_and(|v| v.iter().any(|v| v["secret"]["secretName"] == "kafka-ca"))
        );
        Ok(())
    }

    #[test]
    fn servers_and_routers_mount_only_their_tokens_and_roll_when_they_change()
    -> Result<(), serde_json::Error> {
        use crate::plan::examples::load;
        let mut rollout: Rollout = load("rollout.yaml", 1);
        rollout.spec.traffic.router = Some(Default::default());
        let version: ModelVersion = load("modelversion.yaml", 1);
        let settings = ServingSettings {
            image: "serving".into(),
            traffic_log_image: "flywheel-trainer:test".into(),
            storage_claim: None,
            storage_path: "/var/lib/flywheel".into(),
        };
        let server = serde_json::to_value(version_deployment(
            &rollout, &version, &settings, None, "digest-1",
        )?)?;
        let (router, _) = router(&rollout, &settings, "digest-1")?;
        let router = serde_json::to_value(router)?;
        let pod = |deployment: &Value| deployment["spec"]["template"].clone();
        let secret_keys = |deployment: &Value| -> Vec<String> {
            pod(deployment)["spec"]["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|volume| volume["name"] == "credentials")
                .flat_map(|volume| {
                    volume["secret"]["items"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                })
                .filter_map(|item| item["key"].as_str().map(str::to_owned))
                .collect()
        };
        assert_eq!(secret_keys(&server), [ADMIN_TOKEN_KEY, FEEDBACK_TOKEN_KEY]);
        assert_eq!(
            secret_keys(&router),
            [ADMIN_TOKEN_KEY],
            "the router never sees labels' token"
        );
        let args =
            |deployment: &Value| pod(deployment)["spec"]["containers"][0]["args"].to_string();
        assert!(args(&server).contains("/var/run/flywheel/credentials/admin-token"));
        assert!(args(&server).contains("/var/run/flywheel/credentials/feedback-token"));
        assert!(!args(&server).contains("--allow-model-swap"));
        assert!(args(&router).contains("/var/run/flywheel/credentials/admin-token"));
        for deployment in [&server, &router] {
            assert_eq!(
                pod(deployment)["metadata"]["annotations"][CREDENTIALS_DIGEST_ANNOTATION],
                "digest-1"
            );
        }
        Ok(())
    }

    #[test]
    fn a_router_whose_table_differs_in_any_backend_or_mirror_has_drifted() {
        let desired = route_table("ctr", "ml", &split(Some(("v2", 20)), "v1"));
        let mut live = desired.clone();
        // The router reports weights as floats and may add defaults: still the same table.
        live["backends"][0]["weight"] = json!(20.0);
        assert!(same_routes(&live, &desired));
        live["mirror"] = Value::Null;
        assert!(same_routes(&live, &desired));
        let mut repointed = live.clone();
        repointed["backends"][1]["http"] = json!("http://attacker:8080");
        assert!(!same_routes(&repointed, &desired));
        let mut reweighted = live.clone();
        reweighted["backends"][0]["weight"] = json!(80.0);
        assert!(!same_routes(&reweighted, &desired));
        let mut mirrored = live.clone();
        mirrored["mirror"] = json!({"name": "x", "http": "http://attacker:8080", "percent": 100.0});
        assert!(!same_routes(&mirrored, &desired));
        assert!(!same_routes(&json!({"error": "unauthorized"}), &desired));
    }

    #[test]
    fn long_names_stay_dns_labels() {
        let name = workload_name(&"r".repeat(40), &"v".repeat(40));
        assert!(name.len() <= 63, "{name}");
        assert_ne!(name, workload_name(&"r".repeat(40), &"w".repeat(40)));
    }
}
