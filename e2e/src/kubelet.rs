//! A kubelet stand-in for a control plane without nodes: one node, `flywheel-local`, that watches Pods and plays
//! their lifecycle (Pending → Running → Succeeded/Failed) in pod status.
//!
//! - **Containers.** Containers whose image is one of Flywheel's own (`flywheel-trainer`, `flywheel-serving`)
//!   really run, as local processes of the built binaries in their own process group, with the container's
//!   command, args and env. Env values may be literal (with the kubelet's `$(VAR)` expansion, also in command
//!   and args) or downward-API fields. The exit code becomes the container's. Other images are reported Running
//!   and Ready without running anything. Deleting a pod kills its processes.
//! - **Pod network.** Each pod gets its own loopback address (127.1.0.1, 127.1.0.2, …; Linux routes all of
//!   127/8 to `lo`, so it can be bound without setup), reported as `status.podIP` and given to the downward API.
//!   The address belongs to the pod's DNS identity (namespace, hostname, subdomain) when the pod has both
//!   hostname and subdomain, else to its namespace and name, and is kept while the process runs: a re-created
//!   gang member gets its old address back. All kubelets of a process share one address book (tests run one per
//!   namespace); kubelets in separate processes do not, and may hand out the same addresses. `hostIP` is
//!   127.0.0.1. Pods share the host's network namespace, so each process gets `FLYWHEEL_BIND_ADDRESS` (its pod
//!   address), which Flywheel's servers bind instead of "all interfaces".
//! - **Cluster DNS.** Names `<hostname>.<subdomain>.<namespace>.svc[.cluster.local]` in env values, command and
//!   args are replaced by the address of that pod identity, allocated on first mention, so gang members may start
//!   in any order.
//! - **Termination message.** Each container gets a local file standing for the one the kubelet mounts at its
//!   `terminationMessagePath`; an env value or argument equal to that path is replaced by the local file's path.
//!   On exit, `state.terminated.message` follows `terminationMessagePolicy` as the kubelet does: the file's
//!   content, or with `FallbackToLogsOnError` and a failed container whose file is empty, the tail of its log.
//! - **Extended resources.** The node advertises none unless given ([`Kubelet::with_capacity`]). A pod requesting
//!   more of a resource other than cpu, memory, ephemeral-storage and hugepages than is free stays Pending with
//!   `PodScheduled=False`, reason `Unschedulable`, as the scheduler reports it; it is admitted (higher priority
//!   first) once pods finish or are deleted and it fits. An admitted pod holds its resources until it finishes or
//!   is deleted.
//!
//! - **Service names.** Each process also sees a hosts file (`crate::cluster_dns`) bind-mounted over its
//!   `/etc/hosts` in a private mount namespace, naming every Service's Ready pods and every pod DNS identity, so
//!   names a process builds or reads at run time (a router's route table) resolve too.
//! - **ConfigMap volumes.** A pod's `configMap` volumes are projected into its work directory, their mount paths
//!   in command, args and env point there, and the files follow the ConfigMap while the pod runs
//!   (`crate::config_volumes`). A pod whose required ConfigMap is missing waits, Pending, as with the kubelet.
//!
//! Limits, by design: one attempt per container (restartPolicy is not replayed; the operator restarts gangs by
//! making new pods); no init containers, volumes other than ConfigMaps, probes, `envFrom`, or ConfigMap, Secret
//! and resource-field env sources; cpu and memory are not accounted; node selectors, affinity and tolerations are
//! ignored; pods are not bound (`spec.nodeName` stays empty) and no Events are written. There is no kube-proxy: a
//! Service name resolves to its pods' addresses (as a headless Service's does), so a Service port must equal its
//! target port. A process that writes to its termination-message path without being told it (a default path)
//! writes to the real path on this machine. Separate addresses keep pods' ports apart but do not isolate them.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use futures::channel::oneshot;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{ConfigMap, Container, EnvVar, Pod, PodSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::process::Command;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::cluster_dns::{self, ClusterDns, ReadyPod};
use crate::config_volumes::{self, ConfigMapVolume};

/// Images whose containers run for real.
pub const OWN_IMAGES: [&str; 2] = ["flywheel-trainer", "flywheel-serving"];

/// The one node this stand-in plays (`spec.nodeName` through the downward API).
pub const NODE_NAME: &str = "flywheel-local";

/// The node's own address (`status.hostIP`).
const HOST_IP: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// The first address handed to a pod; 127.0.0.0/16 is left to the host's own services.
const FIRST_POD_ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 1, 0, 1);

/// The last address of 127.0.0.0/8 that is neither a network nor a broadcast address.
const LAST_POD_ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 255, 255, 254);

/// Where the kubelet mounts the termination-message file when the container does not say.
const DEFAULT_TERMINATION_MESSAGE_PATH: &str = "/dev/termination-log";

/// The kubelet keeps at most 4096 bytes of termination message per container (the end of the file).
const MAX_TERMINATION_MESSAGE: usize = 4096;

/// `FallbackToLogsOnError` takes at most the last 80 lines of the log…
const MAX_TERMINATION_LOG_LINES: usize = 80;

/// …and of those at most the last 2048 bytes.
const MAX_TERMINATION_LOG_BYTES: usize = 2048;

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("watching pods: {0}")]
    Watch(#[from] watcher::Error),
}

pub struct Kubelet {
    client: Client,
    bin_dir: PathBuf,
    work_dir: PathBuf,
    namespace: Option<String>,
    capacity: BTreeMap<String, u64>,
}

impl Kubelet {
    /// A kubelet for all namespaces running binaries from `bin_dir`, with container output under `work_dir`.
    pub fn new(client: Client, bin_dir: PathBuf, work_dir: PathBuf) -> Self {
        Kubelet {
            client,
            bin_dir,
            work_dir,
            namespace: None,
            capacity: BTreeMap::new(),
        }
    }

    /// Restricts the kubelet to one namespace (tests that share a cluster).
    pub fn in_namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.to_owned());
        self
    }

    /// Advertises extended resources (`nvidia.com/gpu` → 8, MIG profiles, …) that pods may request; without
    /// them a pod requesting any stays Unschedulable.
    pub fn with_capacity(mut self, capacity: BTreeMap<String, u64>) -> Self {
        self.capacity = capacity;
        self
    }

    /// Watches pods until the watch ends; a watch error is retried by the watcher's backoff.
    pub async fn run(self) -> Result<(), KubeletError> {
        let api: Api<Pod> = match &self.namespace {
            Some(namespace) => Api::namespaced(self.client.clone(), namespace),
            None => Api::all(self.client.clone()),
        };
        let (finished_tx, mut finished_rx) = mpsc::unbounded_channel();
        let mut node = Node {
            client: self.client,
            bin_dir: self.bin_dir,
            work_dir: self.work_dir,
            capacity: self.capacity,
            admitted: HashMap::new(),
            pending: Vec::new(),
            finished: HashSet::new(),
            relisted: None,
            finished_tx,
        };
        let services = tokio::spawn(cluster_dns::watch_services(
            node.client.clone(),
            self.namespace.clone(),
        ));
        let events = watcher::watcher(api, watcher::Config::default());
        let mut events = std::pin::pin!(kube::runtime::WatchStreamExt::default_backoff(events));
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(Ok(event)) => node.on_event(event).await,
                    Some(Err(err)) => warn!(error = %err, "pod watch failed; retrying"),
                    None => break,
                },
                // The node holds a sender, so the channel never closes while this loop runs.
                Some(uid) = finished_rx.recv() => node.on_finished(&uid).await,
            }
        }
        services.abort();
        // Dropping the node drops every pod's stop sender: running containers are killed.
        Ok(())
    }
}

/// The node's bookkeeping, owned by the watch loop.
struct Node {
    client: Client,
    bin_dir: PathBuf,
    work_dir: PathBuf,
    capacity: BTreeMap<String, u64>,
    /// Pods running on the node, by uid.
    admitted: HashMap<String, AdmittedPod>,
    /// Pods waiting for extended resources, in arrival order.
    pending: Vec<PendingPod>,
    /// Pods whose containers have run: never run twice, even if a stale event shows them Running.
    finished: HashSet<String>,
    /// Uids listed since the watch (re)started; pods not among them were deleted while it was down.
    relisted: Option<HashSet<String>>,
    finished_tx: mpsc::UnboundedSender<String>,
}

struct AdmittedPod {
    requests: BTreeMap<String, u64>,
    stop: oneshot::Sender<()>,
}

struct PendingPod {
    uid: String,
    pod: Pod,
    requests: BTreeMap<String, u64>,
    /// The Unschedulable message last written to the pod, so it is written once per change.
    reported: Option<String>,
}

impl Node {
    async fn on_event(&mut self, event: Event<Pod>) {
        match event {
            Event::Init => self.relisted = Some(HashSet::new()),
            Event::InitApply(pod) => {
                if let Some(relisted) = &mut self.relisted {
                    relisted.insert(pod.uid().unwrap_or_default());
                }
                self.on_pod(pod).await;
            }
            Event::InitDone => {
                if let Some(relisted) = self.relisted.take() {
                    let gone: Vec<String> = self
                        .admitted
                        .keys()
                        .chain(self.pending.iter().map(|pending| &pending.uid))
                        .filter(|uid| !relisted.contains(*uid))
                        .cloned()
                        .collect();
                    for uid in &gone {
                        self.forget(uid);
                    }
                    self.finished.retain(|uid| relisted.contains(uid));
                    self.schedule_pending().await;
                }
            }
            Event::Apply(pod) => self.on_pod(pod).await,
            Event::Delete(pod) => {
                self.forget(&pod.uid().unwrap_or_default());
                self.schedule_pending().await;
            }
        }
    }

    async fn on_pod(&mut self, pod: Pod) {
        let uid = pod.uid().unwrap_or_default();
        let known = self.admitted.contains_key(&uid)
            || self.finished.contains(&uid)
            || self.pending.iter().any(|pending| pending.uid == uid);
        if known || pod.metadata.deletion_timestamp.is_some() || is_finished(&pod) {
            return;
        }
        let requests = pod.spec.as_ref().map(extended_requests).unwrap_or_default();
        self.pending.push(PendingPod {
            uid,
            pod,
            requests,
            reported: None,
        });
        self.schedule_pending().await;
    }

    /// A pod's containers have all exited: its resources are free again.
    async fn on_finished(&mut self, uid: &str) {
        if self.admitted.remove(uid).is_some() {
            self.finished.insert(uid.to_owned());
            self.schedule_pending().await;
        }
    }

    /// Drops a deleted pod, killing its processes.
    fn forget(&mut self, uid: &str) {
        self.pending.retain(|pending| pending.uid != uid);
        self.finished.remove(uid);
        if let Some(admitted) = self.admitted.remove(uid) {
            let _ = admitted.stop.send(());
        }
    }

    fn free(&self) -> BTreeMap<String, u64> {
        let mut free = self.capacity.clone();
        for admitted in self.admitted.values() {
            for (resource, count) in &admitted.requests {
                if let Some(left) = free.get_mut(resource) {
                    *left = left.saturating_sub(*count);
                }
            }
        }
        free
    }

    /// Admits every pending pod that fits, higher priority first, then in arrival order; a pod that does not fit
    /// does not hold back a later one that does, as with the scheduler.
    async fn schedule_pending(&mut self) {
        let mut pending = std::mem::take(&mut self.pending);
        pending.sort_by_key(|pending| Reverse(priority(&pending.pod)));
        for mut waiting in pending {
            let short = insufficient(&waiting.requests, &self.free());
            if short.is_empty() && self.admit(&waiting) {
                continue;
            }
            if !short.is_empty() {
                let message = unschedulable_message(&short);
                if waiting.reported.as_ref() != Some(&message) {
                    match report_unschedulable(&self.client, &waiting.pod, &message).await {
                        Ok(()) => waiting.reported = Some(message),
                        Err(err) => {
                            warn!(pod = %waiting.pod.name_any(), error = %err, "kubelet could not report Unschedulable")
                        }
                    }
                }
            }
            self.pending.push(waiting);
        }
    }

    /// Starts a pod that fits; false if it cannot get an address.
    fn admit(&mut self, pending: &PendingPod) -> bool {
        let pod = &pending.pod;
        let namespace = pod.namespace().unwrap_or_default();
        let work_dir = self.work_dir.join(&namespace).join(pod.name_any());
        let planned = {
            let mut addresses = POD_ADDRESSES.lock().unwrap_or_else(PoisonError::into_inner);
            plan_pod(pod, &mut addresses, work_dir)
        };
        let Some(launch) = planned else {
            warn!(pod = %pod.name_any(), "kubelet has no loopback address left for the pod");
            return false;
        };
        let (stop, stopped) = oneshot::channel();
        let api = Api::namespaced(self.client.clone(), &namespace);
        let config_maps = Api::namespaced(self.client.clone(), &namespace);
        let bin_dir = self.bin_dir.clone();
        let finished = self.finished_tx.clone();
        let uid = pending.uid.clone();
        tokio::spawn(async move {
            match run_pod(&api, &config_maps, &launch, &bin_dir, stopped).await {
                Ok(PodEnd::Deleted) => return,
                Ok(PodEnd::Finished) => {}
                Err(err) => {
                    warn!(pod = %launch.name, error = %err, "kubelet could not run pod");
                }
            }
            let _ = finished.send(uid);
        });
        self.admitted.insert(
            pending.uid.clone(),
            AdmittedPod {
                requests: pending.requests.clone(),
                stop,
            },
        );
        true
    }
}

fn is_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn priority(pod: &Pod) -> i32 {
    pod.spec
        .as_ref()
        .and_then(|spec| spec.priority)
        .unwrap_or(0)
}

/// Whether `image` (any registry, tag or digest) is one of Flywheel's own images.
pub fn is_own_image(image: &str) -> bool {
    OWN_IMAGES.contains(&image_binary(image).as_str())
}

fn image_binary(image: &str) -> String {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    last.split(':').next().unwrap_or(last).to_owned()
}

// ---------------------------------------------------------------------------------------------------------------
// Pod network

/// What a pod's address belongs to: its DNS name when it has one, so a re-created gang member keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum PodIdentity {
    /// `<hostname>.<subdomain>.<namespace>.svc`
    DnsName {
        namespace: String,
        hostname: String,
        subdomain: String,
    },
    Name {
        namespace: String,
        name: String,
    },
}

impl PodIdentity {
    fn of(pod: &Pod) -> Self {
        let namespace = pod.namespace().unwrap_or_default();
        let spec = pod.spec.as_ref();
        let hostname = spec.and_then(|spec| spec.hostname.clone());
        let subdomain = spec.and_then(|spec| spec.subdomain.clone());
        match (hostname, subdomain) {
            (Some(hostname), Some(subdomain)) if !hostname.is_empty() && !subdomain.is_empty() => {
                PodIdentity::DnsName {
                    namespace,
                    hostname,
                    subdomain,
                }
            }
            _ => PodIdentity::Name {
                namespace,
                name: pod.name_any(),
            },
        }
    }
}

/// The addresses of every kubelet in this process: tests run one per namespace at the same time, and their pods
/// must not share an address.
static POD_ADDRESSES: LazyLock<Mutex<AddressBook>> = LazyLock::new(Mutex::default);

/// Loopback addresses handed out in order, one per pod identity, never reused while the process runs.
struct AddressBook {
    assigned: HashMap<PodIdentity, Ipv4Addr>,
    next: u32,
}

impl Default for AddressBook {
    fn default() -> Self {
        AddressBook {
            assigned: HashMap::new(),
            next: u32::from(FIRST_POD_ADDRESS),
        }
    }
}

impl AddressBook {
    /// The identity's address, allocated on first use; None once 127/8 is used up.
    fn address_of(&mut self, identity: &PodIdentity) -> Option<Ipv4Addr> {
        if let Some(address) = self.assigned.get(identity) {
            return Some(*address);
        }
        let address = loop {
            if self.next > u32::from(LAST_POD_ADDRESS) {
                return None;
            }
            let candidate = Ipv4Addr::from(self.next);
            self.next += 1;
            // .0 and .255 read as network and broadcast addresses to some software.
            if !matches!(candidate.octets()[3], 0 | 255) {
                break candidate;
            }
        };
        self.assigned.insert(identity.clone(), address);
        Some(address)
    }
}

/// Replaces pod DNS names (`<hostname>.<subdomain>.<namespace>.svc`, optionally `.cluster.local` and a final dot)
/// by the address `resolve` gives; a name it has no address for stays as it is, like a failed lookup. A name is a
/// whole token, bounded by the start or end of the text, whitespace, `:`, `,`, `/` or `=`, so hosts in
/// `host:port`, URLs, comma lists and `--flag=host` are found.
fn resolve_cluster_names(
    text: &str,
    mut resolve: impl FnMut(&PodIdentity) -> Option<Ipv4Addr>,
) -> String {
    let is_boundary = |c: char| c.is_whitespace() || matches!(c, ':' | ',' | '/' | '=');
    let mut resolved = String::with_capacity(text.len());
    let mut rest = text;
    loop {
        let end = rest.find(is_boundary).unwrap_or(rest.len());
        let (token, after) = rest.split_at(end);
        match pod_dns_name(token).and_then(|identity| resolve(&identity)) {
            Some(address) => resolved.push_str(&address.to_string()),
            None => resolved.push_str(token),
        }
        let mut after = after.chars();
        match after.next() {
            Some(boundary) => resolved.push(boundary),
            None => return resolved,
        }
        rest = after.as_str();
    }
}

/// The pod identity a token names, if it is a pod DNS name.
fn pod_dns_name(token: &str) -> Option<PodIdentity> {
    // DNS names are case-insensitive; Kubernetes object names are lower case.
    let name = token.to_ascii_lowercase();
    let name = name.strip_suffix('.').unwrap_or(&name);
    let labels = name
        .strip_suffix(".svc.cluster.local")
        .or_else(|| name.strip_suffix(".svc"))?;
    let is_label = |label: &str| {
        !label.is_empty()
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    match labels.split('.').collect::<Vec<_>>()[..] {
        [hostname, subdomain, namespace]
            if [hostname, subdomain, namespace].into_iter().all(is_label) =>
        {
            Some(PodIdentity::DnsName {
                namespace: namespace.to_owned(),
                hostname: hostname.to_owned(),
                subdomain: subdomain.to_owned(),
            })
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Preparing a pod's containers

/// Everything needed to run a pod, worked out when it is admitted.
struct PodLaunch {
    name: String,
    uid: String,
    namespace: String,
    labels: BTreeMap<String, String>,
    pod_ip: Ipv4Addr,
    work_dir: PathBuf,
    /// The pod's `configMap` volumes, projected before its containers start.
    config_maps: Vec<ConfigMapVolume>,
    /// Name and image of every container, for the status.
    containers: Vec<(String, String)>,
    /// The containers that really run.
    own: Vec<ContainerLaunch>,
}

struct ContainerLaunch {
    name: String,
    image: String,
    /// Program (resolved against the bin dir at start) and arguments.
    argv: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    /// The local file standing for the container's termination-message path.
    termination_log: PathBuf,
    fallback_to_logs_on_error: bool,
}

/// Works out a pod's address and its containers' argv and env; None if no address is left.
fn plan_pod(pod: &Pod, addresses: &mut AddressBook, work_dir: PathBuf) -> Option<PodLaunch> {
    let identity = PodIdentity::of(pod);
    let pod_ip = addresses.address_of(&identity)?;
    if let PodIdentity::DnsName {
        namespace,
        hostname,
        subdomain,
    } = &identity
    {
        ClusterDns::global().pod_name(format!("{hostname}.{subdomain}.{namespace}.svc"), pod_ip);
    }
    let config_maps = config_volumes::config_map_volumes(pod, &work_dir);
    let spec = pod.spec.as_ref();
    let containers = spec
        .map(|spec| spec.containers.as_slice())
        .unwrap_or_default();
    // What `hostname` says in the container (the runtime sets HOSTNAME to it).
    let hostname = spec
        .and_then(|spec| spec.hostname.clone())
        .filter(|hostname| !hostname.is_empty())
        .unwrap_or_else(|| pod.name_any());
    let own = containers
        .iter()
        .filter(|c| c.image.as_deref().is_some_and(is_own_image))
        .map(|container| {
            plan_container(
                pod,
                container,
                pod_ip,
                &hostname,
                &work_dir,
                &config_maps,
                &mut |identity| addresses.address_of(identity),
            )
        })
        .collect();
    Some(PodLaunch {
        name: pod.name_any(),
        uid: pod.uid().unwrap_or_default(),
        namespace: pod.namespace().unwrap_or_default(),
        labels: pod.labels().clone(),
        pod_ip,
        config_maps,
        containers: containers
            .iter()
            .map(|c| (c.name.clone(), c.image.clone().unwrap_or_default()))
            .collect(),
        own,
        work_dir,
    })
}

fn plan_container(
    pod: &Pod,
    container: &Container,
    pod_ip: Ipv4Addr,
    hostname: &str,
    work_dir: &Path,
    config_maps: &[ConfigMapVolume],
    resolve: &mut impl FnMut(&PodIdentity) -> Option<Ipv4Addr>,
) -> ContainerLaunch {
    let image = container.image.clone().unwrap_or_default();
    let termination_message_path = container
        .termination_message_path
        .as_deref()
        .filter(|path| !path.is_empty())
        .unwrap_or(DEFAULT_TERMINATION_MESSAGE_PATH);
    let termination_log = work_dir.join(format!("{}.termination-log", container.name));
    let mounts = config_volumes::mounts(container, config_maps);
    let local_path = |value: String| {
        if value == termination_message_path {
            termination_log.display().to_string()
        } else {
            config_volumes::local_path(&value, &mounts).unwrap_or(value)
        }
    };

    let env = container_env(pod, pod_ip, container.env.as_deref().unwrap_or_default());
    // Command and args may refer to any of the container's variables, as resolved (last definition wins).
    let variables: HashMap<String, String> = env.iter().cloned().collect();
    let expand = |values: &Option<Vec<String>>| -> Vec<String> {
        values
            .iter()
            .flatten()
            .map(|value| expand_references(value, &variables))
            .collect()
    };
    let mut argv = expand(&container.command);
    if argv.is_empty() {
        // The image's entrypoint is the binary the image is named after.
        argv.push(image_binary(&image));
    }
    argv.extend(expand(&container.args));
    let argv = argv
        .into_iter()
        .map(|arg| local_path(resolve_cluster_names(&arg, &mut *resolve)))
        .collect();
    let mut process_env = vec![
        ("HOSTNAME".to_owned(), hostname.to_owned()),
        ("FLYWHEEL_BIND_ADDRESS".to_owned(), pod_ip.to_string()),
    ];
    process_env.extend(env.into_iter().map(|(name, value)| {
        (
            name,
            local_path(resolve_cluster_names(&value, &mut *resolve)),
        )
    }));
    ContainerLaunch {
        name: container.name.clone(),
        log: work_dir.join(format!("{}.log", container.name)),
        image,
        argv,
        env: process_env,
        termination_log,
        fallback_to_logs_on_error: container.termination_message_policy.as_deref()
            == Some("FallbackToLogsOnError"),
    }
}

/// The container's env as the kubelet resolves it, in order: literal values with `$(VAR)` referring to variables
/// defined earlier in the list, and the downward-API fields. Other sources are left out.
fn container_env(pod: &Pod, pod_ip: Ipv4Addr, env: &[EnvVar]) -> Vec<(String, String)> {
    let mut defined: HashMap<String, String> = HashMap::new();
    let mut resolved = Vec::with_capacity(env.len());
    for var in env {
        let literal = var.value.as_deref().unwrap_or_default();
        // As in the kubelet, a non-empty value wins over valueFrom.
        let value = if !literal.is_empty() {
            expand_references(literal, &defined)
        } else if let Some(from) = &var.value_from {
            let Some(field) = from.field_ref.as_ref() else {
                continue;
            };
            let Some(value) = downward_field(pod, pod_ip, &field.field_path) else {
                continue;
            };
            value
        } else {
            String::new()
        };
        defined.insert(var.name.clone(), value.clone());
        resolved.push((var.name.clone(), value));
    }
    resolved
}

/// A `fieldRef` of the downward API.
fn downward_field(pod: &Pod, pod_ip: Ipv4Addr, path: &str) -> Option<String> {
    let spec = pod.spec.as_ref();
    let value = match path {
        "metadata.name" => pod.name_any(),
        "metadata.namespace" => pod.namespace().unwrap_or_default(),
        "metadata.uid" => pod.uid().unwrap_or_default(),
        "spec.nodeName" => NODE_NAME.to_owned(),
        "spec.serviceAccountName" => spec
            .and_then(|spec| spec.service_account_name.clone())
            .unwrap_or_default(),
        "status.hostIP" => HOST_IP.to_string(),
        "status.podIP" | "status.podIPs" => pod_ip.to_string(),
        _ => {
            let (map, key) = if let Some(key) = path.strip_prefix("metadata.labels") {
                (pod.labels(), key)
            } else {
                (
                    pod.annotations(),
                    path.strip_prefix("metadata.annotations")?,
                )
            };
            let key = key.strip_prefix("['")?.strip_suffix("']")?;
            map.get(key).cloned().unwrap_or_default()
        }
    };
    Some(value)
}

/// Expands `$(NAME)` references like the kubelet (Kubernetes' `third_party/forked/golang/expansion`): a known
/// name becomes its value, an unknown one stays verbatim, `$$` is an escaped `$` (so `$$(NAME)` gives `$(NAME)`),
/// and any other `$` is kept.
fn expand_references(input: &str, variables: &HashMap<String, String>) -> String {
    let bytes = input.as_bytes();
    let mut expanded = String::with_capacity(input.len());
    let mut copied_to = 0;
    let mut cursor = 0;
    while cursor < bytes.len() {
        if bytes[cursor] != b'$' || cursor + 1 == bytes.len() {
            cursor += 1;
            continue;
        }
        expanded.push_str(&input[copied_to..cursor]);
        match bytes[cursor + 1] {
            b'$' => {
                expanded.push('$');
                cursor += 2;
            }
            b'(' => {
                let name_start = cursor + 2;
                match input[name_start..].find(')') {
                    Some(length) => {
                        let name = &input[name_start..name_start + length];
                        match variables.get(name) {
                            Some(value) => expanded.push_str(value),
                            None => expanded.push_str(&input[cursor..=name_start + length]),
                        }
                        cursor = name_start + length + 1;
                    }
                    // An unclosed reference is text; scanning goes on after its `$(`.
                    None => {
                        expanded.push_str("$(");
                        cursor = name_start;
                    }
                }
            }
            _ => {
                expanded.push('$');
                cursor += 1;
            }
        }
        copied_to = cursor;
    }
    expanded.push_str(&input[copied_to..]);
    expanded
}

// ---------------------------------------------------------------------------------------------------------------
// Extended resources

/// Resources the node accounts for: all but those the stand-in does not model.
fn is_extended_resource(name: &str) -> bool {
    !matches!(name, "cpu" | "memory" | "ephemeral-storage") && !name.starts_with("hugepages-")
}

/// The pod's extended-resource requests as the scheduler counts them: the sum over containers, at least the
/// largest init container's, plus the pod overhead. A container's request defaults to its limit.
fn extended_requests(spec: &PodSpec) -> BTreeMap<String, u64> {
    fn of_container(container: &Container) -> BTreeMap<String, u64> {
        let resources = container.resources.as_ref();
        let limits = resources
            .and_then(|r| r.limits.as_ref())
            .into_iter()
            .flatten();
        let requests = resources
            .and_then(|r| r.requests.as_ref())
            .into_iter()
            .flatten();
        // Requests come second so they override limits.
        extended_counts(limits.chain(requests))
    }
    let mut total = BTreeMap::new();
    for container in &spec.containers {
        for (resource, count) in of_container(container) {
            let sum: &mut u64 = total.entry(resource).or_default();
            *sum = sum.saturating_add(count);
        }
    }
    for container in spec.init_containers.iter().flatten() {
        for (resource, count) in of_container(container) {
            let most: &mut u64 = total.entry(resource).or_default();
            *most = (*most).max(count);
        }
    }
    for (resource, count) in extended_counts(spec.overhead.iter().flatten()) {
        let sum: &mut u64 = total.entry(resource).or_default();
        *sum = sum.saturating_add(count);
    }
    total.retain(|_, count| *count > 0);
    total
}

fn extended_counts<'a>(
    quantities: impl Iterator<Item = (&'a String, &'a Quantity)>,
) -> BTreeMap<String, u64> {
    quantities
        .filter(|(resource, _)| is_extended_resource(resource))
        // The API server only accepts whole numbers here; anything else could never fit.
        .map(|(resource, quantity)| {
            (
                resource.clone(),
                parse_count(&quantity.0).unwrap_or(u64::MAX),
            )
        })
        .collect()
}

/// The resources a pod needs more of than is free, in name order.
fn insufficient(requests: &BTreeMap<String, u64>, free: &BTreeMap<String, u64>) -> Vec<String> {
    requests
        .iter()
        .filter(|(resource, count)| **count > free.get(*resource).copied().unwrap_or(0))
        .map(|(resource, _)| resource.clone())
        .collect()
}

/// The scheduler's message for a pod that fits no node, for this one-node cluster.
fn unschedulable_message(insufficient: &[String]) -> String {
    let reasons: Vec<String> = insufficient
        .iter()
        .map(|resource| format!("1 Insufficient {resource}"))
        .collect();
    format!("0/1 nodes are available: {}.", reasons.join(", "))
}

/// A resource quantity that must be a whole number (`8`, `1k`, `2Ki`, `1000m`, `1e3`); None otherwise.
fn parse_count(quantity: &str) -> Option<u64> {
    let quantity = quantity.strip_prefix('+').unwrap_or(quantity);
    let number_end = quantity
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(quantity.len());
    let (number, suffix) = quantity.split_at(number_end);
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    let mut numerator: u128 = format!("{whole}{fraction}").parse().ok()?;
    let mut denominator = 10u128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
    let binary = |power: u32| 1024u128.checked_pow(power);
    let decimal = |power: u32| 1000u128.checked_pow(power);
    let multiplier = match suffix {
        "" => Some(1),
        "m" => {
            denominator = denominator.checked_mul(1000)?;
            Some(1)
        }
        "k" => decimal(1),
        "M" => decimal(2),
        "G" => decimal(3),
        "T" => decimal(4),
        "P" => decimal(5),
        "E" => decimal(6),
        "Ki" => binary(1),
        "Mi" => binary(2),
        "Gi" => binary(3),
        "Ti" => binary(4),
        "Pi" => binary(5),
        "Ei" => binary(6),
        exponent => {
            let power: i32 = exponent.strip_prefix(['e', 'E'])?.parse().ok()?;
            let scale = 10u128.checked_pow(power.unsigned_abs())?;
            if power < 0 {
                denominator = denominator.checked_mul(scale)?;
                Some(1)
            } else {
                Some(scale)
            }
        }
    }?;
    numerator = numerator.checked_mul(multiplier)?;
    if !numerator.is_multiple_of(denominator) {
        return None;
    }
    u64::try_from(numerator / denominator).ok()
}

async fn report_unschedulable(
    client: &Client,
    pod: &Pod,
    message: &str,
) -> Result<(), kube::Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
    info!(pod = %pod.name_any(), message, "kubelet: pod is unschedulable");
    set_status(
        &api,
        &pod.name_any(),
        json!({
            "phase": "Pending",
            "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                "lastProbeTime": null, "lastTransitionTime": Timestamp::now().to_string(),
            }],
        }),
    )
    .await
}

// ---------------------------------------------------------------------------------------------------------------
// Running a pod

#[derive(Debug, thiserror::Error)]
enum PodError {
    #[error("updating pod status: {0}")]
    Status(#[from] kube::Error),
}

enum PodEnd {
    /// Its containers exited (or could not run): its resources are free.
    Finished,
    /// It was deleted (or the kubelet stopped) first.
    Deleted,
}

struct Outcome {
    name: String,
    image: String,
    exit_code: i32,
    /// The runtime's reason when the container exited on its own is Completed or Error.
    cannot_run: bool,
    message: String,
    started: Timestamp,
    finished: Timestamp,
}

async fn run_pod(
    api: &Api<Pod>,
    config_maps: &Api<ConfigMap>,
    launch: &PodLaunch,
    bin_dir: &Path,
    mut stopped: oneshot::Receiver<()>,
) -> Result<PodEnd, PodError> {
    if launch.own.is_empty() {
        // Nothing runs: the pod stays Running, holding its resources, until it is deleted.
        set_status(api, &launch.name, running_status(launch, Timestamp::now())).await?;
        let _ = stopped.await;
        return Ok(PodEnd::Deleted);
    }
    tokio::select! {
        () = project_until_done(config_maps, launch) => {}
        _ = &mut stopped => return Ok(PodEnd::Deleted),
    }
    let started = Timestamp::now();
    set_status(api, &launch.name, running_status(launch, started)).await?;
    info!(pod = %launch.name, containers = launch.own.len(), ip = %launch.pod_ip, "kubelet starting containers");
    let dns = ClusterDns::global();
    dns.pod_ready(
        &launch.uid,
        ReadyPod {
            namespace: launch.namespace.clone(),
            labels: launch.labels.clone(),
            address: launch.pod_ip,
        },
    );
    let _unlisted = Unlist(&launch.uid);
    let outcomes = match std::fs::create_dir_all(&launch.work_dir) {
        Ok(()) => {
            let runs = launch
                .own
                .iter()
                .map(|container| run_container(launch, container, bin_dir));
            tokio::select! {
                outcomes = futures::future::join_all(runs) => outcomes,
                never = keep_projecting(config_maps, launch) => match never {},
                // Pod deleted: dropping the futures kills the processes (kill_on_drop); nothing is left to report to.
                _ = stopped => return Ok(PodEnd::Deleted),
            }
        }
        Err(err) => {
            let message = format!(
                "kubelet: cannot create {}: {err}",
                launch.work_dir.display()
            );
            launch
                .own
                .iter()
                .map(|container| cannot_run(container, started, message.clone()))
                .collect()
        }
    };
    let failed = outcomes.iter().any(|outcome| outcome.exit_code != 0);
    let phase = if failed { "Failed" } else { "Succeeded" };
    info!(pod = %launch.name, phase, "kubelet: pod finished");
    set_status(
        api,
        &launch.name,
        finished_status(launch, phase, &outcomes, started),
    )
    .await?;
    Ok(PodEnd::Finished)
}

/// Projects every ConfigMap volume of the pod; the first that fails stops it.
async fn project_all(
    api: &Api<ConfigMap>,
    launch: &PodLaunch,
) -> Result<(), config_volumes::VolumeError> {
    for volume in &launch.config_maps {
        config_volumes::project(api, volume).await?;
    }
    Ok(())
}

/// Projects the pod's ConfigMap volumes, retrying until all are in place: a required ConfigMap that does not
/// exist yet keeps the pod from starting (the kubelet's ContainerCreating).
async fn project_until_done(api: &Api<ConfigMap>, launch: &PodLaunch) {
    let mut reported = None;
    while let Err(err) = project_all(api, launch).await {
        let error = err.to_string();
        if reported.as_ref() != Some(&error) {
            warn!(pod = %launch.name, error = %error, "kubelet waits for the pod's ConfigMap volumes");
            reported = Some(error);
        }
        tokio::time::sleep(config_volumes::REFRESH).await;
    }
}

/// Keeps the running pod's ConfigMap volumes in step with their ConfigMaps (a failed read keeps the old files).
async fn keep_projecting(api: &Api<ConfigMap>, launch: &PodLaunch) -> std::convert::Infallible {
    loop {
        tokio::time::sleep(config_volumes::REFRESH).await;
        if let Err(err) = project_all(api, launch).await {
            warn!(pod = %launch.name, error = %err, "kubelet could not refresh a ConfigMap volume");
        }
    }
}

/// Takes a pod's address out of its Services' records when it stops running.
struct Unlist<'a>(&'a str);

impl Drop for Unlist<'_> {
    fn drop(&mut self) {
        ClusterDns::global().pod_gone(self.0);
    }
}

/// Whether processes can be given their own mount namespace here (and so the cluster hosts file).
static MOUNT_NAMESPACES: LazyLock<bool> = LazyLock::new(|| {
    let argv = cluster_dns::with_cluster_hosts(
        ClusterDns::global().hosts_file(),
        &["true".into()],
        nix::unistd::geteuid().is_root(),
    );
    let works = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success());
    if !works {
        warn!(
            "kubelet cannot make mount namespaces (unshare); Service names will not resolve in pods"
        );
    }
    works
});

fn cannot_run(container: &ContainerLaunch, started: Timestamp, message: String) -> Outcome {
    Outcome {
        name: container.name.clone(),
        image: container.image.clone(),
        // What a shell reports for a command it cannot run.
        exit_code: 127,
        cannot_run: true,
        message,
        started,
        finished: Timestamp::now(),
    }
}

async fn run_container(pod: &PodLaunch, container: &ContainerLaunch, bin_dir: &Path) -> Outcome {
    let started = Timestamp::now();
    let Some(program) = container.argv.first() else {
        return cannot_run(container, started, "kubelet: empty command".to_owned());
    };
    let program = resolve_program(program, bin_dir);
    let log = match std::fs::File::create(&container.log)
        .and_then(|file| Ok((file.try_clone()?, file)))
    {
        Ok(files) => files,
        Err(err) => {
            let message = format!("kubelet: cannot create {}: {err}", container.log.display());
            return cannot_run(container, started, message);
        }
    };
    // The kubelet mounts an empty file; one left by an earlier pod of the same name must not be read as this one's.
    if let Err(err) = std::fs::File::create(&container.termination_log) {
        let message = format!(
            "kubelet: cannot create {}: {err}",
            container.termination_log.display()
        );
        return cannot_run(container, started, message);
    }
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut argv: Vec<std::ffi::OsString> = vec![program.clone().into()];
    argv.extend(container.argv[1..].iter().map(Into::into));
    if *MOUNT_NAMESPACES {
        argv = cluster_dns::with_cluster_hosts(
            ClusterDns::global().hosts_file(),
            &argv,
            nix::unistd::geteuid().is_root(),
        );
    }
    let mut command = Command::new(&argv[0]);
    command
        .args(&argv[1..])
        .current_dir(&pod.work_dir)
        .env("PATH", path)
        .envs(container.env.iter().map(|(name, value)| (name, value)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.0))
        .stderr(Stdio::from(log.1))
        .process_group(0)
        .kill_on_drop(true);
    // SAFETY: the closure runs between fork and exec and only makes one async-signal-safe system call (prctl).
    // A kubelet that dies takes its containers with it (a killed demo leaves no server listening). The signal
    // follows the forking thread, a tokio worker, which lives as long as the runtime.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    let status = match command.spawn() {
        Ok(mut child) => {
            // Like a container's cgroup: whatever the entrypoint started dies with it, or with the pod.
            let _group = child.id().map(ProcessGroup);
            child.wait().await
        }
        Err(err) => {
            let message = format!("kubelet: cannot start {}: {err}", program.display());
            return cannot_run(container, started, message);
        }
    };
    let exit_code = match status {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
        }
        Err(err) => {
            let message = format!("kubelet: waiting for {}: {err}", program.display());
            return cannot_run(container, started, message);
        }
    };
    let fallback_to_logs = container.fallback_to_logs_on_error && exit_code != 0;
    Outcome {
        name: container.name.clone(),
        image: container.image.clone(),
        exit_code,
        cannot_run: false,
        message: termination_message(container, fallback_to_logs),
        started,
        finished: Timestamp::now(),
    }
}

/// The kubelet's termination message (kuberuntime's `getTerminationMessage`): the end of the termination-message
/// file; with `fallback_to_logs`, when the file is empty or missing, the end of the log instead.
fn termination_message(container: &ContainerLaunch, fallback_to_logs: bool) -> String {
    let file = match std::fs::read(&container.termination_log) {
        Ok(content) => tail(&content, MAX_TERMINATION_MESSAGE),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(err) => {
            return format!(
                "Error on reading termination log {}: {err}",
                container.termination_log.display()
            );
        }
    };
    if !file.is_empty() || !fallback_to_logs {
        return file;
    }
    match std::fs::read(&container.log) {
        Ok(log) => log_tail(&log),
        Err(err) => format!("Error on reading termination message from logs: {err}"),
    }
}

/// The last `max` bytes of `bytes`, starting on a character boundary.
fn tail(bytes: &[u8], max: usize) -> String {
    let mut start = bytes.len().saturating_sub(max);
    // Skip UTF-8 continuation bytes of a character cut in two.
    while start < bytes.len() && bytes[start] & 0b1100_0000 == 0b1000_0000 {
        start += 1;
    }
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// What `FallbackToLogsOnError` reports: the last 80 lines of the log, of which the last 2048 bytes.
fn log_tail(log: &[u8]) -> String {
    let without_final_newline = log.strip_suffix(b"\n").unwrap_or(log);
    let start = without_final_newline
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, byte)| **byte == b'\n')
        .nth(MAX_TERMINATION_LOG_LINES - 1)
        .map_or(0, |(newline, _)| newline + 1);
    tail(&log[start..], MAX_TERMINATION_LOG_BYTES)
}

/// Kills a container's whole process group when dropped.
struct ProcessGroup(u32);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Our binaries come from the build directory; anything else from PATH.
fn resolve_program(program: &str, bin_dir: &Path) -> PathBuf {
    let built = bin_dir.join(program);
    if !program.contains('/') && built.exists() {
        built
    } else {
        PathBuf::from(program)
    }
}

fn pod_addresses(launch: &PodLaunch) -> serde_json::Value {
    json!({
        "hostIP": HOST_IP.to_string(),
        "podIP": launch.pod_ip.to_string(),
        "podIPs": [{"ip": launch.pod_ip.to_string()}],
    })
}

fn running_status(launch: &PodLaunch, started: Timestamp) -> serde_json::Value {
    let statuses: Vec<_> = launch
        .containers
        .iter()
        .map(|(name, image)| {
            json!({
                "name": name, "image": image, "imageID": "", "ready": true, "started": true, "restartCount": 0,
                "state": {"running": {"startedAt": started.to_string()}},
            })
        })
        .collect();
    let mut status = json!({
        "phase": "Running", "startTime": started.to_string(),
        "conditions": conditions(true, started),
        "containerStatuses": statuses,
    });
    merge(&mut status, pod_addresses(launch));
    status
}

fn finished_status(
    launch: &PodLaunch,
    phase: &str,
    outcomes: &[Outcome],
    started: Timestamp,
) -> serde_json::Value {
    let statuses: Vec<_> = outcomes
        .iter()
        .map(|o| {
            let reason = match (o.cannot_run, o.exit_code) {
                (true, _) => "ContainerCannotRun",
                (false, 0) => "Completed",
                (false, _) => "Error",
            };
            json!({
                "name": o.name, "image": o.image, "imageID": "", "ready": false, "started": false, "restartCount": 0,
                "state": {"terminated": {
                    "exitCode": o.exit_code,
                    "reason": reason,
                    "message": o.message,
                    "startedAt": o.started.to_string(),
                    "finishedAt": o.finished.to_string(),
                }},
            })
        })
        .collect();
    let mut status = json!({
        "phase": phase, "startTime": started.to_string(),
        "conditions": conditions(false, Timestamp::now()),
        "containerStatuses": statuses,
    });
    merge(&mut status, pod_addresses(launch));
    status
}

fn merge(into: &mut serde_json::Value, from: serde_json::Value) {
    if let (Some(into), serde_json::Value::Object(from)) = (into.as_object_mut(), from) {
        into.extend(from);
    }
}

fn conditions(ready: bool, at: Timestamp) -> serde_json::Value {
    let ready = if ready { "True" } else { "False" };
    let at = at.to_string();
    json!([
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": at},
        {"type": "Initialized", "status": "True", "lastTransitionTime": at},
        {"type": "ContainersReady", "status": ready, "lastTransitionTime": at},
        {"type": "Ready", "status": ready, "lastTransitionTime": at},
    ])
}

/// Patches pod status, retrying a few times as the kubelet's status manager would; a deleted pod is not retried.
async fn set_status(
    api: &Api<Pod>,
    name: &str,
    status: serde_json::Value,
) -> Result<(), kube::Error> {
    const ATTEMPTS: u32 = 5;
    let patch = Patch::Merge(json!({ "status": status }));
    let mut attempt = 1;
    loop {
        match api
            .patch_status(name, &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(status)) if status.is_not_found() => {
                return Err(kube::Error::Api(status));
            }
            Err(err) if attempt < ATTEMPTS => {
                warn!(pod = name, error = %err, "kubelet could not update pod status; retrying");
                tokio::time::sleep(Duration::from_millis(200) * attempt).await;
                attempt += 1;
            }
            Err(err) => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap_or_else(|err| panic!("test pod: {err}"))
    }

    fn vars(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    fn member(namespace: &str, hostname: &str, subdomain: &str) -> PodIdentity {
        PodIdentity::DnsName {
            namespace: namespace.to_owned(),
            hostname: hostname.to_owned(),
            subdomain: subdomain.to_owned(),
        }
    }

    fn named(namespace: &str, name: &str) -> PodIdentity {
        PodIdentity::Name {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    #[test]
    fn own_images_are_recognised_with_registry_tag_and_digest() {
        assert!(is_own_image("flywheel-trainer"));
        assert!(is_own_image("ghcr.io/flywheel/flywheel-serving:0.1.0"));
        assert!(is_own_image("localhost:5000/flywheel-trainer@sha256:abc"));
        assert!(!is_own_image("nginx:1.25"));
        assert!(!is_own_image("flywheel-trainer-debug"));
        assert_eq!(
            image_binary("reg:5000/x/flywheel-trainer:1"),
            "flywheel-trainer"
        );
    }

    #[test]
    fn references_expand_like_the_kubelet() {
        let known = vars(&[("A", "alpha"), ("B", "$(A)"), ("EMPTY", "")]);
        let cases = [
            ("$(A)", "alpha"),
            ("x-$(A)-y", "x-alpha-y"),
            ("$(A)$(A)", "alphaalpha"),
            ("$(UNKNOWN)", "$(UNKNOWN)"),
            ("$()", "$()"),
            ("$(EMPTY)", ""),
            // Values are not expanded again.
            ("$(B)", "$(A)"),
            ("$$(A)", "$(A)"),
            ("$$$(A)", "$alpha"),
            ("$$", "$"),
            ("$$$$", "$$"),
            ("a$", "a$"),
            ("$", "$"),
            ("$A", "$A"),
            ("$é", "$é"),
            ("$(A", "$(A"),
            // A name runs to the first `)`, whatever it holds.
            ("$(A $(A)", "$(A $(A)"),
            // An unclosed reference is text, and what follows it is still expanded.
            ("$(x $$ $A", "$(x $ $A"),
            ("é$(A)é", "éalphaé"),
            ("", ""),
        ];
        for (input, want) in cases {
            assert_eq!(expand_references(input, &known), want, "{input:?}");
        }
    }

    #[test]
    fn env_values_see_only_earlier_variables_and_command_sees_all() {
        let pod = pod(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u-1", "labels": {"app": "x"}},
            "spec": {"containers": [{
                "name": "main", "image": "flywheel-trainer",
                "command": ["run", "--a=$(LATER)"],
                "args": ["$(FIRST)/$(LATER)", "$$(FIRST)"],
                "env": [
                    {"name": "FIRST", "value": "one"},
                    {"name": "SECOND", "value": "$(FIRST)-$(LATER)"},
                    {"name": "LATER", "value": "three"},
                    {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                    {"name": "FIRST", "value": "$(FIRST)+"},
                ],
            }]},
        }));
        let ip = Ipv4Addr::new(127, 1, 0, 7);
        let env = container_env(
            &pod,
            ip,
            pod.spec
                .as_ref()
                .map(|s| &s.containers[0])
                .and_then(|c| c.env.as_deref())
                .unwrap_or_default(),
        );
        let env: Vec<(&str, &str)> = env.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        assert_eq!(
            env,
            [
                ("FIRST", "one"),
                ("SECOND", "one-$(LATER)"),
                ("LATER", "three"),
                ("IP", "127.1.0.7"),
                ("APP", "x"),
                ("FIRST", "one+"),
            ]
        );
        let mut book = AddressBook::default();
        let launch = plan_pod(&pod, &mut book, PathBuf::from("/w/ns/p"));
        let launch = launch.unwrap_or_else(|| panic!("no address"));
        assert_eq!(launch.pod_ip, FIRST_POD_ADDRESS);
        assert_eq!(
            launch.own[0].argv,
            ["run", "--a=three", "one+/three", "$(FIRST)"]
        );
        assert_eq!(
            launch.own[0].env[0],
            ("HOSTNAME".to_owned(), "p".to_owned())
        );
    }

    #[test]
    fn addresses_are_sequential_stable_and_skip_network_and_broadcast() {
        let mut book = AddressBook {
            assigned: HashMap::new(),
            next: u32::from(Ipv4Addr::new(127, 1, 0, 254)),
        };
        let a = book.address_of(&named("ns", "a"));
        let b = book.address_of(&member("ns", "ps-0", "job"));
        assert_eq!(a, Some(Ipv4Addr::new(127, 1, 0, 254)));
        assert_eq!(b, Some(Ipv4Addr::new(127, 1, 1, 1)));
        assert_eq!(book.address_of(&named("ns", "a")), a);
        assert_eq!(book.address_of(&member("ns", "ps-0", "job")), b);
        assert_eq!(
            book.address_of(&member("other", "ps-0", "job")),
            Some(Ipv4Addr::new(127, 1, 1, 2))
        );

        let mut fresh = AddressBook::default();
        assert_eq!(fresh.address_of(&named("ns", "a")), Some(FIRST_POD_ADDRESS));

        let mut full = AddressBook {
            assigned: HashMap::new(),
            next: u32::from(LAST_POD_ADDRESS),
        };
        assert_eq!(full.address_of(&named("ns", "a")), Some(LAST_POD_ADDRESS));
        assert_eq!(full.address_of(&named("ns", "b")), None);
    }

    #[test]
    fn a_pod_is_identified_by_its_dns_name_when_it_has_one() {
        let gang = pod(json!({
            "metadata": {"name": "job-ps-0-abc", "namespace": "ns"},
            "spec": {"hostname": "ps-0", "subdomain": "job", "containers": []},
        }));
        assert_eq!(PodIdentity::of(&gang), member("ns", "ps-0", "job"));
        let hostname_only = pod(json!({
            "metadata": {"name": "solo", "namespace": "ns"},
            "spec": {"hostname": "ps-0", "containers": []},
        }));
        assert_eq!(PodIdentity::of(&hostname_only), named("ns", "solo"));
    }

    #[test]
    fn pod_dns_names_resolve_to_their_addresses() {
        let mut book = AddressBook::default();
        let ps = book.address_of(&member("ns", "ps-0", "job"));
        assert_eq!(ps, Some(FIRST_POD_ADDRESS));
        let mut resolve = |text: &str| resolve_cluster_names(text, |id| book.address_of(id));
        assert_eq!(resolve("ps-0.job.ns.svc:7070"), "127.1.0.1:7070");
        assert_eq!(
            resolve("ps-0.job.ns.svc.cluster.local:7070"),
            "127.1.0.1:7070"
        );
        assert_eq!(resolve("ps-0.job.ns.svc.cluster.local."), "127.1.0.1");
        assert_eq!(resolve("PS-0.Job.ns.SVC"), "127.1.0.1");
        // A member not seen yet gets its address now.
        assert_eq!(
            resolve("ps-0.job.ns.svc:7070,ps-1.job.ns.svc:7070"),
            "127.1.0.1:7070,127.1.0.2:7070"
        );
        assert_eq!(
            resolve("--ps=ps-1.job.ns.svc:7070 --chief http://worker-0.job.ns.svc/x"),
            "--ps=127.1.0.2:7070 --chief http://127.1.0.3/x"
        );
        assert_eq!(resolve("a\tps-1.job.ns.svc\n"), "a\t127.1.0.2\n");
        // Not pod names: a Service, another domain, a longer name, a part of a word.
        for text in [
            "job.ns.svc:7070",
            "ps-0.job.ns.svc.example.com",
            "x.ps-0.job.ns.svc",
            "ps-0.job.ns.svcs",
            "ps-0.job.ns.svc;",
            "ps_0.job.ns.svc",
            "ps-0..ns.svc",
            "",
            "::",
        ] {
            assert_eq!(resolve(text), text);
        }
    }

    #[test]
    fn gang_members_find_each_other_and_the_termination_file() {
        let gang_member = |hostname: &str| {
            pod(json!({
                "metadata": {"name": format!("job-{hostname}"), "namespace": "ns"},
                "spec": {"hostname": hostname, "subdomain": "job", "containers": [{
                    "name": "trainer", "image": "flywheel-trainer",
                    "terminationMessagePath": "/tmp/result",
                    "args": ["--listen=$(POD_IP):7070", "--ps", "$(PS)", "--out", "/tmp/result"],
                    "env": [
                        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        {"name": "PS", "value": "ps-0.job.ns.svc:7070"},
                        {"name": "RESULT", "value": "/tmp/result"},
                        {"name": "DEFAULT", "value": "/dev/termination-log"},
                    ],
                }]},
            }))
        };
        let mut book = AddressBook::default();
        // The worker starts first: the parameter server's address is allocated for it.
        let worker = plan_pod(
            &gang_member("worker-0"),
            &mut book,
            PathBuf::from("/w/ns/job-worker-0"),
        );
        let ps = plan_pod(
            &gang_member("ps-0"),
            &mut book,
            PathBuf::from("/w/ns/job-ps-0"),
        );
        let (Some(worker), Some(ps)) = (worker, ps) else {
            panic!("no address");
        };
        assert_eq!(worker.pod_ip, Ipv4Addr::new(127, 1, 0, 1));
        assert_eq!(ps.pod_ip, Ipv4Addr::new(127, 1, 0, 2));
        let container = &worker.own[0];
        assert_eq!(
            container.termination_log,
            Path::new("/w/ns/job-worker-0/trainer.termination-log")
        );
        assert_eq!(
            container.argv,
            [
                "flywheel-trainer",
                "--listen=127.1.0.1:7070",
                "--ps",
                "127.1.0.2:7070",
                "--out",
                "/w/ns/job-worker-0/trainer.termination-log",
            ]
        );
        let env: HashMap<_, _> = container.env.iter().cloned().collect();
        assert_eq!(env["HOSTNAME"], "worker-0");
        assert_eq!(env["POD_IP"], "127.1.0.1");
        assert_eq!(env["PS"], "127.1.0.2:7070");
        assert_eq!(env["RESULT"], "/w/ns/job-worker-0/trainer.termination-log");
        // Only the container's own path is its termination file.
        assert_eq!(env["DEFAULT"], "/dev/termination-log");
        assert!(!container.fallback_to_logs_on_error);
    }

    #[test]
    fn termination_message_follows_the_policy() {
        let dir =
            std::env::temp_dir().join(format!("flywheel-kubelet-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|err| panic!("{err}"));
        let container = |name: &str, fallback: bool| ContainerLaunch {
            name: name.to_owned(),
            image: "flywheel-trainer".to_owned(),
            argv: vec![],
            env: vec![],
            log: dir.join(format!("{name}.log")),
            termination_log: dir.join(format!("{name}.termination-log")),
            fallback_to_logs_on_error: fallback,
        };
        let write = |path: &Path, content: &str| {
            std::fs::write(path, content).unwrap_or_else(|err| panic!("{err}"));
        };

        let written = container("written", true);
        write(&written.log, "log line\n");
        write(&written.termination_log, "{\"auc\":0.8}");
        assert_eq!(termination_message(&written, true), "{\"auc\":0.8}");

        let silent = container("silent", false);
        write(&silent.log, "boom\n");
        write(&silent.termination_log, "");
        // File policy: an empty file is an empty message, whatever the log says.
        assert_eq!(termination_message(&silent, false), "");
        // FallbackToLogsOnError on a failure: the log's tail.
        assert_eq!(termination_message(&silent, true), "boom\n");

        let missing = container("missing", false);
        assert_eq!(termination_message(&missing, false), "");

        let huge = container("huge", false);
        write(&huge.termination_log, &format!("{}END", "x".repeat(10_000)));
        let message = termination_message(&huge, false);
        assert_eq!(message.len(), MAX_TERMINATION_MESSAGE);
        assert!(message.ends_with("END"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tails_cut_on_characters_lines_and_bytes() {
        assert_eq!(tail(b"short", 4096), "short");
        // "é" is two bytes: a cut through it starts after it.
        assert_eq!(tail("aéb".as_bytes(), 2), "b");
        assert_eq!(tail("aéb".as_bytes(), 3), "éb");

        let lines: String = (1..=100).map(|n| format!("line {n}\n")).collect();
        let tail = log_tail(lines.as_bytes());
        assert!(tail.starts_with("line 21\n"), "{tail}");
        assert!(tail.ends_with("line 100\n"));
        assert_eq!(tail.lines().count(), MAX_TERMINATION_LOG_LINES);
        assert_eq!(log_tail(b"a\nb"), "a\nb");
        assert_eq!(log_tail(b""), "");

        let long_lines = format!("{}\n{}\n", "y".repeat(3000), "z".repeat(100));
        let tail = log_tail(long_lines.as_bytes());
        assert_eq!(tail.len(), MAX_TERMINATION_LOG_BYTES);
        assert!(tail.ends_with(&format!("\n{}\n", "z".repeat(100))));
    }

    #[test]
    fn extended_requests_sum_containers_and_default_to_limits() {
        let spec: PodSpec = serde_json::from_value(json!({
            "containers": [
                {"name": "a", "resources": {
                    "limits": {"nvidia.com/gpu": "2", "cpu": "4", "memory": "1Gi", "hugepages-2Mi": "1Gi"},
                }},
                {"name": "b", "resources": {
                    "requests": {"nvidia.com/gpu": "1", "nvidia.com/mig-1g.10gb": "1", "ephemeral-storage": "1Gi"},
                    "limits": {"nvidia.com/gpu": "1", "nvidia.com/mig-1g.10gb": "1"},
                }},
                {"name": "c"},
            ],
            "initContainers": [
                {"name": "init", "resources": {"limits": {"nvidia.com/gpu": "5", "example.com/dongle": "0"}}},
            ],
        }))
        .unwrap_or_else(|err| panic!("{err}"));
        let requests = extended_requests(&spec);
        assert_eq!(
            requests,
            BTreeMap::from([
                ("nvidia.com/gpu".to_owned(), 5),
                ("nvidia.com/mig-1g.10gb".to_owned(), 1),
            ])
        );
    }

    #[test]
    fn a_pod_that_does_not_fit_gets_the_schedulers_message() {
        let requests = BTreeMap::from([
            ("nvidia.com/mig-1g.10gb".to_owned(), 1),
            ("nvidia.com/gpu".to_owned(), 2),
        ]);
        let free = BTreeMap::from([("nvidia.com/gpu".to_owned(), 2)]);
        assert_eq!(insufficient(&requests, &free), ["nvidia.com/mig-1g.10gb"]);
        assert_eq!(
            unschedulable_message(&insufficient(&requests, &BTreeMap::new())),
            "0/1 nodes are available: 1 Insufficient nvidia.com/gpu, 1 Insufficient nvidia.com/mig-1g.10gb."
        );
        let fits = BTreeMap::from([
            ("nvidia.com/gpu".to_owned(), 8),
            ("nvidia.com/mig-1g.10gb".to_owned(), 1),
        ]);
        assert!(insufficient(&requests, &fits).is_empty());
    }

    #[test]
    fn counts_parse_like_whole_quantities() {
        for (text, want) in [
            ("8", Some(8)),
            ("+8", Some(8)),
            ("0", Some(0)),
            ("1k", Some(1000)),
            ("2Ki", Some(2048)),
            ("1000m", Some(1)),
            ("1.5k", Some(1500)),
            ("1e3", Some(1000)),
            ("10e-1", Some(1)),
            ("1.5", None),
            ("500m", None),
            ("-1", None),
            ("", None),
            ("gpu", None),
            ("1x", None),
            ("99999999999999999999999E", None),
        ] {
            assert_eq!(parse_count(text), want, "{text:?}");
        }
    }
}
