//! Who may reach a Rollout's pods. The inference ports (HTTP, gRPC) take anyone: clients, the router, mirrors.
//! The admin port (route table and model swaps, behind the admin token; `/metrics`) takes only the Rollout's
//! own router, the operator's pods, and metrics scrapers: pods labelled `app.kubernetes.io/name: prometheus`
//! (the Prometheus Operator's label) or any pod of a namespace labelled `flywheel.dev/metrics-scraper: "true"`.
//! The traffic log's sink takes no connections. Enforced where the cluster's network plugin enforces
//! NetworkPolicies.

use flywheel_crds::Rollout;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::json;

use super::traffic::{ADMIN_PORT, GRPC_PORT, HTTP_PORT, LABEL_ROLE, LABEL_ROLLOUT, workload_name};
use crate::objects::owner;

/// A namespace with this label set to `"true"` may scrape every Rollout's metrics.
pub const METRICS_SCRAPER_NAMESPACE_LABEL: &str = "flywheel.dev/metrics-scraper";
/// The label the chart gives the operator's pods.
pub const OPERATOR_POD_LABEL: (&str, &str) = ("app.kubernetes.io/name", "flywheel-operator");

pub fn policy_name(rollout: &str) -> String {
    workload_name(rollout, "network")
}

pub fn network_policy(rollout: &Rollout) -> Result<NetworkPolicy, serde_json::Error> {
    let name = rollout.metadata.name.clone().unwrap_or_default();
    let any_namespace = json!({});
    let tcp = |port: i32| json!({"port": port, "protocol": "TCP"});
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": policy_name(&name),
            "namespace": rollout.metadata.namespace,
            "labels": {LABEL_ROLLOUT: name, LABEL_ROLE: "network"},
            "ownerReferences": [owner(rollout)],
        },
        "spec": {
            "podSelector": {"matchLabels": {LABEL_ROLLOUT: name}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"ports": [tcp(HTTP_PORT), tcp(GRPC_PORT)]},
                {
                    "ports": [tcp(ADMIN_PORT)],
                    "from": [
                        {"podSelector": {"matchLabels": {LABEL_ROLLOUT: name, LABEL_ROLE: "router"}}},
                        {
                            "namespaceSelector": any_namespace,
                            "podSelector": {"matchLabels": {OPERATOR_POD_LABEL.0: OPERATOR_POD_LABEL.1}},
                        },
                        {
                            "namespaceSelector": any_namespace,
                            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
                        },
                        {"namespaceSelector": {"matchLabels": {METRICS_SCRAPER_NAMESPACE_LABEL: "true"}}},
                    ],
                },
            ],
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::examples::load;
    use kube::ResourceExt;

    #[test]
    fn inference_is_open_and_the_admin_port_takes_the_router_the_operator_and_scrapers()
    -> anyhow::Result<()> {
        let mut rollout: Rollout = load("rollout.yaml", 1);
        rollout.metadata.namespace = Some("ml".into());
        let policy = network_policy(&rollout)?;
        assert_eq!(policy.name_any(), "ctr-network");
        let spec = policy.spec.unwrap_or_default();
        assert_eq!(
            spec.pod_selector
                .and_then(|s| s.match_labels)
                .unwrap_or_default()
                .get(LABEL_ROLLOUT)
                .map(String::as_str),
            Some("ctr")
        );
        let ingress = spec.ingress.unwrap_or_default();
        let ports = |rule: usize| -> Vec<String> {
            ingress[rule]
                .ports
                .clone()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|p| {
                    p.port
                        .map(|p| serde_json::to_string(&p).unwrap_or_default())
                })
                .collect()
        };
        assert_eq!(ports(0), ["8080", "8081"]);
        assert!(ingress[0].from.is_none(), "anyone may ask for a score");
        assert_eq!(ports(1), ["8082"]);
        let peers = ingress[1].from.clone().unwrap_or_default();
        assert_eq!(peers.len(), 4);
        let router = peers[0]
            .pod_selector
            .clone()
            .and_then(|s| s.match_labels)
            .unwrap_or_default();
        assert_eq!(router.get(LABEL_ROLE).map(String::as_str), Some("router"));
        assert!(
            peers[0].namespace_selector.is_none(),
            "only this namespace's router"
        );
        Ok(())
    }
}
