//! Cluster DNS for the kubelet stand-in: Service names (`<service>.<namespace>.svc[.cluster.local]`) and pod DNS
//! identities resolve to the addresses of the stand-in's pods, for names a process builds or reads at run time
//! (a router's route table, a URL in a config file), not only those spelled out in its env and args.
//!
//! There is no DNS server: every pod process runs in a private mount namespace (`unshare`) in which one hosts
//! file, kept by this module, is bind-mounted over `/etc/hosts`, and glibc reads it on every lookup. A Service
//! with a selector names the addresses of the Ready pods it selects (as a headless Service's records do; there is
//! no kube-proxy, so a Service port must equal its target port). The file is rewritten in place, never renamed:
//! a bind mount of a single file holds on to its inode.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex, PoisonError};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use tracing::warn;

/// A pod that answers for its Services.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadyPod {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub address: Ipv4Addr,
}

/// What the hosts file is made of.
#[derive(Default)]
struct Records {
    /// The host's own /etc/hosts, kept first so `localhost` and the machine's names still resolve.
    base: String,
    /// Selector of every Service with one, by (namespace, name).
    services: BTreeMap<(String, String), BTreeMap<String, String>>,
    /// Ready pods by uid.
    pods: HashMap<String, ReadyPod>,
    /// Pod DNS names (`<hostname>.<subdomain>.<namespace>.svc`) and their addresses.
    pod_names: BTreeMap<String, Ipv4Addr>,
}

/// The hosts file every pod of this process sees (kubelets of one process share their addresses, so they share
/// their names too).
pub struct ClusterDns {
    path: PathBuf,
    records: Mutex<Records>,
}

static CLUSTER_DNS: LazyLock<ClusterDns> = LazyLock::new(|| {
    let dns = ClusterDns {
        path: std::env::temp_dir().join(format!("flywheel-kubelet-{}.hosts", std::process::id())),
        records: Mutex::new(Records {
            base: std::fs::read_to_string("/etc/hosts").unwrap_or_default(),
            ..Records::default()
        }),
    };
    dns.update(|_| {});
    dns
});

impl ClusterDns {
    pub fn global() -> &'static ClusterDns {
        &CLUSTER_DNS
    }

    pub fn hosts_file(&self) -> &Path {
        &self.path
    }

    pub fn set_service(&self, namespace: &str, name: &str, selector: BTreeMap<String, String>) {
        let key = (namespace.to_owned(), name.to_owned());
        self.update(|records| {
            // A Service without a selector has manually managed endpoints, which the stand-in does not play.
            if selector.is_empty() {
                records.services.remove(&key);
            } else {
                records.services.insert(key, selector);
            }
        });
    }

    pub fn remove_service(&self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        self.update(|records| {
            records.services.remove(&key);
        });
    }

    pub fn pod_ready(&self, uid: &str, pod: ReadyPod) {
        self.update(|records| {
            records.pods.insert(uid.to_owned(), pod);
        });
    }

    pub fn pod_gone(&self, uid: &str) {
        self.update(|records| {
            records.pods.remove(uid);
        });
    }

    pub fn pod_name(&self, name: String, address: Ipv4Addr) {
        self.update(|records| {
            records.pod_names.insert(name, address);
        });
    }

    fn update(&self, change: impl FnOnce(&mut Records)) {
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        let before = hosts(&records);
        change(&mut records);
        let after = hosts(&records);
        if after == before && self.path.exists() {
            return;
        }
        // In place, under the lock, so writers never interleave.
        let written = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(&self.path)
            .and_then(|mut file| file.write_all(after.as_bytes()));
        if let Err(err) = written {
            warn!(path = %self.path.display(), error = %err, "kubelet could not write the cluster hosts file");
        }
    }
}

/// The hosts file: the host's own entries, then one line per (Service, Ready pod it selects), then pod names.
fn hosts(records: &Records) -> String {
    let mut text = records.base.clone();
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str("# cluster names (flywheel kubelet stand-in)\n");
    for ((namespace, name), selector) in &records.services {
        let mut addresses: Vec<Ipv4Addr> = records
            .pods
            .values()
            .filter(|pod| {
                &pod.namespace == namespace
                    && selector
                        .iter()
                        .all(|(key, value)| pod.labels.get(key) == Some(value))
            })
            .map(|pod| pod.address)
            .collect();
        addresses.sort();
        for address in addresses {
            text.push_str(&format!(
                "{address} {name}.{namespace}.svc {name}.{namespace}.svc.cluster.local\n"
            ));
        }
    }
    for (name, address) in &records.pod_names {
        text.push_str(&format!("{address} {name} {name}.cluster.local\n"));
    }
    text
}

/// Keeps the Services of `namespace` (all when None) in the hosts file.
pub async fn watch_services(client: Client, namespace: Option<String>) {
    let api: Api<Service> = match &namespace {
        Some(namespace) => Api::namespaced(client, namespace),
        None => Api::all(client),
    };
    let dns = ClusterDns::global();
    let events = watcher::watcher(api, watcher::Config::default());
    let mut events = std::pin::pin!(kube::runtime::WatchStreamExt::default_backoff(events));
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Apply(service) | Event::InitApply(service)) => {
                let selector = service
                    .spec
                    .as_ref()
                    .and_then(|spec| spec.selector.clone())
                    .unwrap_or_default();
                dns.set_service(
                    &service.namespace().unwrap_or_default(),
                    &service.name_any(),
                    selector,
                );
            }
            Ok(Event::Delete(service)) => dns.remove_service(
                &service.namespace().unwrap_or_default(),
                &service.name_any(),
            ),
            Ok(Event::Init | Event::InitDone) => {}
            Err(err) => warn!(error = %err, "service watch failed; retrying"),
        }
    }
}

/// The program and arguments that run `argv` with `hosts` as its `/etc/hosts`, in a private mount namespace (as
/// root directly; otherwise in a user namespace mapping this user to root, which Debian allows by default). The
/// shell execs, so the process keeps the pid (and process group) it was started with.
pub fn with_cluster_hosts(hosts: &Path, argv: &[OsString], as_root: bool) -> Vec<OsString> {
    let mut wrapped: Vec<OsString> = vec!["unshare".into()];
    if !as_root {
        wrapped.extend(["--user".into(), "--map-root-user".into()]);
    }
    wrapped.extend([
        "--mount".into(),
        "--propagation".into(),
        "private".into(),
        "--".into(),
        "sh".into(),
        "-c".into(),
        "mount --bind \"$0\" /etc/hosts && exec \"$@\"".into(),
        hosts.as_os_str().to_owned(),
    ]);
    wrapped.extend(argv.iter().cloned());
    wrapped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn services_name_the_ready_pods_they_select_in_their_namespace() {
        let mut records = Records {
            base: "127.0.0.1 localhost".to_owned(),
            ..Records::default()
        };
        records.services.insert(
            ("ml".to_owned(), "ctr-v2".to_owned()),
            labels(&[("version", "v2")]),
        );
        let pod = |namespace: &str, version: &str, last: u8| ReadyPod {
            namespace: namespace.to_owned(),
            labels: labels(&[("version", version), ("role", "serve")]),
            address: Ipv4Addr::new(127, 1, 0, last),
        };
        records.pods.insert("a".to_owned(), pod("ml", "v2", 9));
        records.pods.insert("b".to_owned(), pod("ml", "v2", 3));
        records.pods.insert("c".to_owned(), pod("ml", "v1", 4));
        records.pods.insert("d".to_owned(), pod("other", "v2", 5));
        records
            .pod_names
            .insert("ps-0.job.ml.svc".to_owned(), Ipv4Addr::new(127, 1, 0, 7));
        assert_eq!(
            hosts(&records),
            "127.0.0.1 localhost\n# cluster names (flywheel kubelet stand-in)\n\
             127.1.0.3 ctr-v2.ml.svc ctr-v2.ml.svc.cluster.local\n\
             127.1.0.9 ctr-v2.ml.svc ctr-v2.ml.svc.cluster.local\n\
             127.1.0.7 ps-0.job.ml.svc ps-0.job.ml.svc.cluster.local\n"
        );
    }

    #[test]
    fn the_wrapper_binds_the_hosts_file_and_execs_the_program() {
        let argv: Vec<OsString> = vec!["flywheel-serving".into(), "route".into()];
        let wrapped = with_cluster_hosts(Path::new("/tmp/h"), &argv, true);
        let text: Vec<String> = wrapped
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(text[0], "unshare");
        assert!(!text.contains(&"--map-root-user".to_owned()));
        assert_eq!(
            &text[text.len() - 3..],
            ["/tmp/h", "flywheel-serving", "route"]
        );
        let unprivileged = with_cluster_hosts(Path::new("/tmp/h"), &argv, false);
        assert!(unprivileged.contains(&OsString::from("--map-root-user")));
    }
}
