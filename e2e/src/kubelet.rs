//! A kubelet stand-in for a control plane without nodes. It watches Pods and plays their lifecycle
//! (Pending → Running → Succeeded/Failed) in pod status. Containers whose image is one of Flywheel's own
//! (`flywheel-trainer`, `flywheel-serving`) really run, as local processes of the built binaries with the
//! container's command, args and env; their exit code becomes the container's and the tail of their output the
//! termination message. Other images are reported Running and Ready without running anything.
//!
//! Limits, by design: one attempt per container (restartPolicy is not replayed; the operator restarts gangs by
//! making new pods), no volumes or probes, every pod's IP is 127.0.0.1.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use futures::StreamExt;
use futures::channel::oneshot;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Container, EnvVar, Pod};
use kube::api::{Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use tokio::process::Command;
use tracing::{info, warn};

/// Images whose containers run for real.
pub const OWN_IMAGES: [&str; 2] = ["flywheel-trainer", "flywheel-serving"];

/// Kubernetes keeps at most 4096 bytes of termination message per container.
const MAX_TERMINATION_MESSAGE: usize = 4096;

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
}

impl Kubelet {
    /// A kubelet for all namespaces running binaries from `bin_dir`, with container output under `work_dir`.
    pub fn new(client: Client, bin_dir: PathBuf, work_dir: PathBuf) -> Self {
        Kubelet {
            client,
            bin_dir,
            work_dir,
            namespace: None,
        }
    }

    /// Restricts the kubelet to one namespace (tests that share a cluster).
    pub fn in_namespace(mut self, namespace: &str) -> Self {
        self.namespace = Some(namespace.to_owned());
        self
    }

    /// Watches pods until the watch ends; a watch error is retried by the watcher's backoff.
    pub async fn run(self) -> Result<(), KubeletError> {
        let api: Api<Pod> = match &self.namespace {
            Some(namespace) => Api::namespaced(self.client.clone(), namespace),
            None => Api::all(self.client.clone()),
        };
        let mut running: HashMap<String, oneshot::Sender<()>> = HashMap::new();
        let events = watcher::watcher(api, watcher::Config::default());
        let mut events = std::pin::pin!(kube::runtime::WatchStreamExt::default_backoff(events));
        while let Some(event) = events.next().await {
            let event = match event {
                Ok(event) => event,
                Err(err) => {
                    warn!(error = %err, "pod watch failed; retrying");
                    continue;
                }
            };
            match event {
                Event::Apply(pod) | Event::InitApply(pod) => {
                    let uid = pod.uid().unwrap_or_default();
                    running.retain(|_, stop| !stop.is_canceled());
                    if running.contains_key(&uid)
                        || pod.metadata.deletion_timestamp.is_some()
                        || is_finished(&pod)
                    {
                        continue;
                    }
                    let (stop, stopped) = oneshot::channel();
                    running.insert(uid, stop);
                    let api =
                        Api::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
                    let bin_dir = self.bin_dir.clone();
                    let work_dir = self
                        .work_dir
                        .join(pod.namespace().unwrap_or_default())
                        .join(pod.name_any());
                    tokio::spawn(async move {
                        if let Err(err) = run_pod(&api, &pod, &bin_dir, &work_dir, stopped).await {
                            warn!(pod = %pod.name_any(), error = %err, "kubelet could not run pod");
                        }
                    });
                }
                Event::Delete(pod) => {
                    if let Some(stop) = running.remove(&pod.uid().unwrap_or_default()) {
                        let _ = stop.send(());
                    }
                }
                Event::Init | Event::InitDone => {}
            }
        }
        Ok(())
    }
}

fn is_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Whether `image` (any registry, tag or digest) is one of Flywheel's own images.
pub fn is_own_image(image: &str) -> bool {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    let name = last.split(':').next().unwrap_or(last);
    OWN_IMAGES.contains(&name)
}

#[derive(Debug, thiserror::Error)]
enum PodError {
    #[error("updating pod status: {0}")]
    Status(#[from] kube::Error),
    #[error("preparing {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

struct Outcome {
    name: String,
    image: String,
    exit_code: i32,
    message: String,
    started: Timestamp,
    finished: Timestamp,
}

async fn run_pod(
    api: &Api<Pod>,
    pod: &Pod,
    bin_dir: &Path,
    work_dir: &Path,
    stopped: oneshot::Receiver<()>,
) -> Result<(), PodError> {
    let name = pod.name_any();
    let containers = pod
        .spec
        .as_ref()
        .map(|spec| spec.containers.clone())
        .unwrap_or_default();
    let started = Timestamp::now();
    set_status(api, &name, running_status(&containers, started)).await?;
    let own: Vec<&Container> = containers
        .iter()
        .filter(|c| c.image.as_deref().is_some_and(is_own_image))
        .collect();
    if own.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(work_dir).map_err(|source| PodError::Io {
        path: work_dir.to_owned(),
        source,
    })?;
    info!(pod = %name, containers = own.len(), "kubelet starting containers");
    let runs = own
        .iter()
        .map(|container| run_container(pod, container, bin_dir, work_dir));
    let outcomes = tokio::select! {
        outcomes = futures::future::join_all(runs) => outcomes,
        // Pod deleted: dropping the futures kills the processes (kill_on_drop); nothing is left to report to.
        _ = stopped => return Ok(()),
    };
    let failed = outcomes.iter().any(|outcome| outcome.exit_code != 0);
    let phase = if failed { "Failed" } else { "Succeeded" };
    info!(pod = %name, phase, "kubelet: pod finished");
    set_status(api, &name, finished_status(phase, &outcomes, started)).await?;
    Ok(())
}

async fn run_container(
    pod: &Pod,
    container: &Container,
    bin_dir: &Path,
    work_dir: &Path,
) -> Outcome {
    let started = Timestamp::now();
    let image = container.image.clone().unwrap_or_default();
    let outcome = |exit_code, message: String| Outcome {
        name: container.name.clone(),
        image: image.clone(),
        exit_code,
        message,
        started,
        finished: Timestamp::now(),
    };
    let mut argv: Vec<String> = container.command.clone().unwrap_or_default();
    if argv.is_empty() {
        // The image's entrypoint is the binary the image is named after.
        argv.push(image_binary(&image));
    }
    argv.extend(container.args.clone().unwrap_or_default());
    let program = resolve_program(&argv[0], bin_dir);
    let log_path = work_dir.join(format!("{}.log", container.name));
    let log = match std::fs::File::create(&log_path).and_then(|file| Ok((file.try_clone()?, file)))
    {
        Ok(files) => files,
        Err(err) => {
            return outcome(
                128,
                format!("kubelet: cannot create {}: {err}", log_path.display()),
            );
        }
    };
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut command = Command::new(&program);
    command
        .args(&argv[1..])
        .current_dir(work_dir)
        .env("PATH", path)
        .env("HOSTNAME", pod.name_any())
        .envs(container_env(
            pod,
            container.env.as_deref().unwrap_or_default(),
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.0))
        .stderr(Stdio::from(log.1))
        .process_group(0)
        .kill_on_drop(true);
    let status = match command.spawn() {
        Ok(mut child) => {
            // Like a container's cgroup: whatever the entrypoint started dies with it, or with the pod.
            let _group = child.id().map(ProcessGroup);
            child.wait().await
        }
        Err(err) => {
            return outcome(
                127,
                format!("kubelet: cannot start {}: {err}", program.display()),
            );
        }
    };
    let message = tail(&std::fs::read(&log_path).unwrap_or_default());
    match status {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            let code = status
                .code()
                .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
            outcome(code, message)
        }
        Err(err) => outcome(
            128,
            format!("kubelet: waiting for {}: {err}", program.display()),
        ),
    }
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

fn image_binary(image: &str) -> String {
    let without_digest = image.split('@').next().unwrap_or(image);
    let last = without_digest.rsplit('/').next().unwrap_or(without_digest);
    last.split(':').next().unwrap_or(last).to_owned()
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

/// The container's env: literal values, and the downward-API fields a pod commonly reads.
fn container_env(pod: &Pod, env: &[EnvVar]) -> Vec<(String, String)> {
    env.iter()
        .filter_map(|var| {
            if let Some(value) = &var.value {
                return Some((var.name.clone(), value.clone()));
            }
            let field = var
                .value_from
                .as_ref()?
                .field_ref
                .as_ref()?
                .field_path
                .as_str();
            let value = match field {
                "metadata.name" => pod.name_any(),
                "metadata.namespace" => pod.namespace().unwrap_or_default(),
                "metadata.uid" => pod.uid().unwrap_or_default(),
                "status.podIP" | "status.hostIP" => "127.0.0.1".to_owned(),
                "spec.nodeName" => "flywheel-local".to_owned(),
                _ => return None,
            };
            Some((var.name.clone(), value))
        })
        .collect()
}

/// The last 4096 bytes of output, cut on a character boundary.
fn tail(output: &[u8]) -> String {
    let text = String::from_utf8_lossy(output);
    if text.len() <= MAX_TERMINATION_MESSAGE {
        return text.into_owned();
    }
    let mut start = text.len() - MAX_TERMINATION_MESSAGE;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_owned()
}

fn running_status(containers: &[Container], started: Timestamp) -> serde_json::Value {
    let statuses: Vec<_> = containers
        .iter()
        .map(|c| {
            json!({
                "name": c.name, "image": c.image, "imageID": "", "ready": true, "started": true, "restartCount": 0,
                "state": {"running": {"startedAt": started.to_string()}},
            })
        })
        .collect();
    json!({
        "phase": "Running", "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "startTime": started.to_string(),
        "conditions": conditions(true, started),
        "containerStatuses": statuses,
    })
}

fn finished_status(phase: &str, outcomes: &[Outcome], started: Timestamp) -> serde_json::Value {
    let statuses: Vec<_> = outcomes
        .iter()
        .map(|o| {
            json!({
                "name": o.name, "image": o.image, "imageID": "", "ready": false, "started": false, "restartCount": 0,
                "state": {"terminated": {
                    "exitCode": o.exit_code,
                    "reason": if o.exit_code == 0 { "Completed" } else { "Error" },
                    "message": o.message,
                    "startedAt": o.started.to_string(),
                    "finishedAt": o.finished.to_string(),
                }},
            })
        })
        .collect();
    json!({
        "phase": phase, "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "startTime": started.to_string(),
        "conditions": conditions(false, Timestamp::now()),
        "containerStatuses": statuses,
    })
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

async fn set_status(
    api: &Api<Pod>,
    name: &str,
    status: serde_json::Value,
) -> Result<(), kube::Error> {
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn termination_message_keeps_the_tail() {
        let output = format!("{}END", "x".repeat(10_000));
        let message = tail(output.as_bytes());
        assert_eq!(message.len(), MAX_TERMINATION_MESSAGE);
        assert!(message.ends_with("END"));
        assert_eq!(tail(b"short"), "short");
    }
}
