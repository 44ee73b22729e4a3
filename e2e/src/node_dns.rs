//! Cluster DNS records of the local node, as Kubernetes' DNS specification defines them: a Service with a
//! ClusterIP answers with it; a headless Service answers with the addresses of its endpoints, and an endpoint
//! with a hostname (a pod with `hostname` and `subdomain`) gets `<hostname>.<service>.<namespace>.svc.<domain>`.
//! The records are written as a hosts file that dnsmasq serves (`--hostsdir` reloads it on change).

use std::collections::BTreeSet;
use std::path::Path;

use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::ResourceExt;

/// The hosts file for these Services and Endpoints, sorted so an unchanged cluster gives the same bytes.
pub fn hosts_file<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    endpoints: impl IntoIterator<Item = &'a Endpoints>,
    domain: &str,
) -> String {
    let mut records = BTreeSet::new();
    let mut headless = BTreeSet::new();
    for service in services {
        let namespace = service.namespace().unwrap_or_default();
        let name = format!("{}.{namespace}.svc.{domain}", service.name_any());
        match service
            .spec
            .as_ref()
            .and_then(|spec| spec.cluster_ip.as_deref())
        {
            Some("None") => {
                headless.insert((namespace, service.name_any()));
            }
            Some(ip) if !ip.is_empty() => {
                records.insert((ip.to_owned(), name));
            }
            _ => {}
        }
    }
    for endpoint in endpoints {
        let namespace = endpoint.namespace().unwrap_or_default();
        let service = endpoint.name_any();
        if !headless.contains(&(namespace.clone(), service.clone())) {
            continue;
        }
        let name = format!("{service}.{namespace}.svc.{domain}");
        let addresses = endpoint
            .subsets
            .iter()
            .flatten()
            .flat_map(|subset| subset.addresses.iter().flatten());
        for address in addresses {
            records.insert((address.ip.clone(), name.clone()));
            if let Some(hostname) = address.hostname.as_deref().filter(|h| !h.is_empty()) {
                records.insert((address.ip.clone(), format!("{hostname}.{name}")));
            }
        }
    }
    records
        .into_iter()
        .map(|(ip, name)| format!("{ip} {name}\n"))
        .collect()
}

/// Replaces `path` with `contents` in one rename, so a reader never sees half a file. The staging file is a
/// dotfile, which dnsmasq does not read from its hosts directory.
pub fn write_atomically(path: &Path, contents: &str) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&staging, contents)?;
    std::fs::rename(&staging, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EndpointAddress, EndpointSubset, ServiceSpec};
    use kube::api::ObjectMeta;

    fn meta(namespace: &str, name: &str) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..ObjectMeta::default()
        }
    }

    fn service(namespace: &str, name: &str, cluster_ip: &str) -> Service {
        Service {
            metadata: meta(namespace, name),
            spec: Some(ServiceSpec {
                cluster_ip: Some(cluster_ip.to_owned()),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    fn endpoints(namespace: &str, name: &str, addresses: &[(&str, Option<&str>)]) -> Endpoints {
        Endpoints {
            metadata: meta(namespace, name),
            subsets: Some(vec![EndpointSubset {
                addresses: Some(
                    addresses
                        .iter()
                        .map(|(ip, hostname)| EndpointAddress {
                            ip: (*ip).to_owned(),
                            hostname: hostname.map(str::to_owned),
                            ..EndpointAddress::default()
                        })
                        .collect(),
                ),
                ..EndpointSubset::default()
            }]),
        }
    }

    #[test]
    fn a_cluster_ip_service_answers_with_its_ip_and_ignores_its_endpoints() {
        let services = [service("ml", "ctr", "10.96.0.20")];
        let endpoints = [endpoints("ml", "ctr", &[("10.244.0.5", None)])];
        assert_eq!(
            hosts_file(&services, &endpoints, "cluster.local"),
            "10.96.0.20 ctr.ml.svc.cluster.local\n"
        );
    }

    #[test]
    fn a_headless_service_answers_with_its_endpoints_and_their_hostnames() {
        let services = [service("ml", "job", "None")];
        let endpoints = [endpoints(
            "ml",
            "job",
            &[("10.244.0.7", Some("ps-0")), ("10.244.0.8", None)],
        )];
        assert_eq!(
            hosts_file(&services, &endpoints, "cluster.local"),
            "10.244.0.7 job.ml.svc.cluster.local\n\
             10.244.0.7 ps-0.job.ml.svc.cluster.local\n\
             10.244.0.8 job.ml.svc.cluster.local\n"
        );
    }

    #[test]
    fn endpoints_without_a_headless_service_and_services_without_an_ip_give_nothing() {
        let services = [service("ml", "pending", "")];
        let endpoints = [endpoints("ml", "orphan", &[("10.244.0.9", Some("x"))])];
        assert_eq!(hosts_file(&services, &endpoints, "cluster.local"), "");
    }
}
