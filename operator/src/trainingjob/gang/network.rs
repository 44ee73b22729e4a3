//! The gang's headless Service (members' DNS names) and its NetworkPolicy.

use flywheel_crds::TrainingJob;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer, NetworkPolicyPort,
    NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;

use super::{RPC_PORT, STATUS_PORT, owner_reference, selector_labels};

/// The headless Service that gives gang members their DNS names.
pub fn service(job: &TrainingJob) -> Service {
    let name = job.name_any();
    Service {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: job.namespace(),
            labels: Some(selector_labels(&name)),
            owner_references: Some(vec![owner_reference(job)]),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            selector: Some(selector_labels(&name)),
            publish_not_ready_addresses: Some(true),
            ports: Some(vec![
                ServicePort {
                    name: Some("rpc".to_owned()),
                    port: i32::from(RPC_PORT),
                    // Server-side apply keys ports by (port, protocol); 1.20 has no default for it.
                    protocol: Some("TCP".to_owned()),
                    ..ServicePort::default()
                },
                ServicePort {
                    name: Some("status".to_owned()),
                    port: i32::from(STATUS_PORT),
                    protocol: Some("TCP".to_owned()),
                    ..ServicePort::default()
                },
            ]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// Name of the gang's NetworkPolicy.
pub fn network_policy_name(job: &str) -> String {
    format!("{job}-gang")
}

/// Who may reach the gang's pods: the shards' and the chief's RPC port only from members of the same gang
/// (parameters and gradients never come from outside it; the gang token authenticates on top), the progress
/// port from anywhere (the operator polls it; it only reads). Enforced where the cluster's network plugin
/// enforces NetworkPolicies.
pub fn network_policy(job: &TrainingJob) -> NetworkPolicy {
    let name = job.name_any();
    let tcp = |port: u16| NetworkPolicyPort {
        port: Some(IntOrString::Int(i32::from(port))),
        protocol: Some("TCP".to_owned()),
        ..NetworkPolicyPort::default()
    };
    let members = LabelSelector {
        match_labels: Some(selector_labels(&name)),
        ..LabelSelector::default()
    };
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(network_policy_name(&name)),
            namespace: job.namespace(),
            labels: Some(selector_labels(&name)),
            owner_references: Some(vec![owner_reference(job)]),
            ..ObjectMeta::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(members.clone()),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![
                NetworkPolicyIngressRule {
                    from: Some(vec![NetworkPolicyPeer {
                        pod_selector: Some(members),
                        ..NetworkPolicyPeer::default()
                    }]),
                    ports: Some(vec![tcp(RPC_PORT)]),
                },
                NetworkPolicyIngressRule {
                    from: None,
                    ports: Some(vec![tcp(STATUS_PORT)]),
                },
            ]),
            ..NetworkPolicySpec::default()
        }),
    }
}
