//! The sink of a Rollout's served traffic (`spec.feedback.trafficLog`): a Deployment of the trainer image
//! running `flywheel-trainer log-traffic`, which writes the prediction log and the clicks into the offline store
//! on the training storage, where a TrainingJob's `spec.data.servedTraffic` reads them.

use flywheel_crds::Rollout;
use flywheel_crds::rollout::TrafficLog;
use k8s_openapi::api::apps::v1::Deployment;
use serde_json::json;

use super::traffic::{LABEL_ROLE, LABEL_ROLLOUT, workload_name};
use crate::config::ServingSettings;
use crate::objects::{owner, security};
use crate::store_access::PodAccess;

/// The role label of the sink's Deployment (the sweep removes it when the spec drops `trafficLog`).
pub const ROLE: &str = "traffic-log";

pub fn deployment_name(rollout: &str) -> String {
    workload_name(rollout, ROLE)
}

/// The sink's consumer group: offsets survive restarts, and two Rollouts never share one.
pub fn consumer_group(namespace: &str, rollout: &str) -> String {
    format!("flywheel-traffic-log.{namespace}.{rollout}")
}

/// The Deployment, or `None` when the Rollout logs no traffic. One replica: each part holds what one consumer
/// read, and a second would only split the partitions.
pub fn deployment(
    rollout: &Rollout,
    settings: &ServingSettings,
) -> Result<Option<Deployment>, serde_json::Error> {
    let Some((feedback, log)) = rollout
        .spec
        .feedback
        .as_ref()
        .and_then(|f| Some((f, f.traffic_log.as_ref()?)))
    else {
        return Ok(None);
    };
    let Some(predictions_topic) = &feedback.prediction_log_topic else {
        return Ok(None);
    };
    let name = rollout.metadata.name.clone().unwrap_or_default();
    let namespace = rollout.metadata.namespace.clone().unwrap_or_default();
    let labels = json!({LABEL_ROLLOUT: name, LABEL_ROLE: ROLE});
    let mut env = vec![
        json!({"name": "FLYWHEEL_KAFKA_BROKERS", "value": feedback.brokers.join(",")}),
        json!({"name": "FLYWHEEL_PREDICTION_LOG_TOPIC", "value": predictions_topic}),
        json!({"name": "FLYWHEEL_TRAFFIC_GROUP", "value": consumer_group(&namespace, &name)}),
        json!({"name": "FLYWHEEL_TRAFFIC_LOG", "value": log.uri}),
    ];
    if let Some(clicks) = &feedback.clicks_topic {
        env.push(json!({"name": "FLYWHEEL_CLICKS_TOPIC", "value": clicks}));
    }
    let (mut volumes, mut mounts) = match &settings.storage_claim {
        Some(claim) => (
            json!([{"name": "storage", "persistentVolumeClaim": {"claimName": claim}}]),
            json!([{"name": "storage", "mountPath": settings.storage_path}]),
        ),
        None => (json!([]), json!([])),
    };
    PodAccess::kafka(feedback.security.as_ref()).add_to(&mut env, &mut volumes, &mut mounts);
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": deployment_name(&name),
            "namespace": namespace,
            "labels": labels,
            "ownerReferences": [owner(rollout)],
        },
        "spec": {
            "replicas": 1,
            // Two sinks of one group at once would only hand partitions back and forth.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "automountServiceAccountToken": false,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "runAsGroup": 65532,
                                        "fsGroup": 65532},
                    // The sink writes its last part when stopped.
                    "terminationGracePeriodSeconds": 60,
                    "volumes": volumes,
                    "containers": [{
                        "name": "log-traffic",
                        "image": settings.traffic_log_image,
                        "args": ["log-traffic", "--flush-interval", flush_interval(log)],
                        "env": env,
                        "volumeMounts": mounts,
                        // A sink that cannot reach the brokers ends with its reason, which the Rollout's
                        // TrafficLogged condition shows.
                        "terminationMessagePolicy": "FallbackToLogsOnError",
                        "securityContext": security(),
                    }],
                },
            },
        },
    }))
    .map(Some)
}

fn flush_interval(log: &TrafficLog) -> &str {
    log.flush_interval.as_ref().map_or("1m", |d| d.0.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::examples::load;
    use flywheel_crds::rollout::Feedback;
    use kube::ResourceExt;

    fn settings() -> ServingSettings {
        ServingSettings {
            image: "flywheel-serving:test".into(),
            traffic_log_image: "flywheel-trainer:test".into(),
            storage_claim: Some("flywheel-data".into()),
            storage_path: "/var/lib/flywheel".into(),
        }
    }

    fn rollout(log: Option<TrafficLog>) -> Rollout {
        let mut rollout: Rollout = load("rollout.yaml", 1);
        rollout.metadata.namespace = Some("ml".into());
        rollout.spec.feedback = Some(Feedback {
            brokers: vec!["kafka-0:9092".into(), "kafka-1:9092".into()],
            clicks_topic: Some("clicks".into()),
            prediction_log_topic: Some("predictions".into()),
            traffic_log: log,
            security: None,
        });
        rollout
    }

    #[test]
    fn the_sink_reads_both_topics_into_the_storage_with_its_own_group() -> anyhow::Result<()> {
        let log = TrafficLog {
            uri: "file:///var/lib/flywheel/traffic/ctr".into(),
            flush_interval: Some(flywheel_crds::common::Duration::from("30s")),
        };
        let deployment = deployment(&rollout(Some(log)), &settings())?
            .ok_or_else(|| anyhow::anyhow!("expected the sink"))?;
        assert_eq!(deployment.name_any(), "ctr-traffic-log");
        assert_eq!(deployment.labels()[LABEL_ROLE], ROLE);
        let pod = deployment
            .spec
            .and_then(|s| s.template.spec)
            .unwrap_or_default();
        let container = &pod.containers[0];
        assert_eq!(container.image.as_deref(), Some("flywheel-trainer:test"));
        assert_eq!(
            container.args.clone().unwrap_or_default(),
            vec!["log-traffic", "--flush-interval", "30s"]
        );
        let env: Vec<(String, String)> = container
            .env
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|v| (v.name, v.value.unwrap_or_default()))
            .collect();
        for expected in [
            ("FLYWHEEL_KAFKA_BROKERS", "kafka-0:9092,kafka-1:9092"),
            ("FLYWHEEL_PREDICTION_LOG_TOPIC", "predictions"),
            ("FLYWHEEL_CLICKS_TOPIC", "clicks"),
            ("FLYWHEEL_TRAFFIC_GROUP", "flywheel-traffic-log.ml.ctr"),
            (
                "FLYWHEEL_TRAFFIC_LOG",
                "file:///var/lib/flywheel/traffic/ctr",
            ),
        ] {
            assert!(
                env.contains(&(expected.0.to_owned(), expected.1.to_owned())),
                "{expected:?} in {env:?}"
            );
        }
        let claim = pod
            .volumes
            .unwrap_or_default()
            .into_iter()
            .find_map(|v| v.persistent_volume_claim)
            .ok_or_else(|| anyhow::anyhow!("the storage volume"))?;
        assert_eq!(
            (claim.claim_name.as_str(), claim.read_only),
            ("flywheel-data", None),
            "the sink writes to the storage"
        );
        Ok(())
    }

    #[test]
    fn no_traffic_log_no_sink() -> anyhow::Result<()> {
        assert!(deployment(&rollout(None), &settings())?.is_none());
        Ok(())
    }
}
