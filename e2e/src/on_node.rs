//! What the tests on the real node share: the operator installed by its chart (once per test binary),
//! namespaces whose training storage is a volume on the node's disk, pods of the trainer image run to
//! completion, and the Docker containers behind pods.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{ListParams, LogParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::cluster::{ClusterError, TestCluster};
use crate::helm::{HelmError, helm};
use crate::images::image;
use crate::repo_root;
use crate::wait::{Timeout, until};

/// Where the chart mounts the training storage claim in every training pod.
pub const STORAGE: &str = "/var/lib/flywheel";
/// The claim training pods mount (the chart's `training.storageClaim`).
pub const CLAIM: &str = "flywheel-data";
/// The node's address (its CNI bridge's gateway): pods reach services of this machine, such as a Redis
/// standing in for a managed store, there.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The namespace the chart's release (the operator's pods, its Lease) lives in.
pub const RELEASE_NAMESPACE: &str = "flywheel-system";
const SETTLE: Duration = Duration::from_secs(90);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("the cluster: {0}")]
    Cluster(String),
    #[error(transparent)]
    ClusterCall(#[from] ClusterError),
    #[error(transparent)]
    Helm(#[from] HelmError),
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("a manifest: {0}")]
    Manifest(#[from] serde_json::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Timeout(#[from] Timeout),
    #[error("pod {pod} ended {phase}:\n{log}")]
    PodFailed {
        pod: String,
        phase: String,
        log: String,
    },
    #[error("docker {args:?}: {stderr}")]
    Docker { args: Vec<String>, stderr: String },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> NodeError {
    let what = what.into();
    move |source| NodeError::Io { what, source }
}

/// The node's cluster with the operator installed by the chart as release `flywheel` in `flywheel-system`:
/// one replica unless `values` say otherwise, the locally built images, training pods mounting the claim
/// `flywheel-data` of their namespace at `STORAGE`. Installed once per test binary, with the `values` of the
/// first call.
pub async fn operator(values: &[&str]) -> Result<&'static TestCluster, NodeError> {
    static INSTALLED: tokio::sync::OnceCell<Result<(), String>> =
        tokio::sync::OnceCell::const_new();
    let cluster = TestCluster::with_node().map_err(NodeError::Cluster)?;
    INSTALLED
        .get_or_init(|| async {
            let chart = repo_root().join("charts/flywheel");
            let chart = chart.to_string_lossy();
            let kubeconfig = cluster.kubeconfig().to_string_lossy();
            let storage_claim = format!("training.storageClaim={CLAIM}");
            let storage_path = format!("training.storagePath={STORAGE}");
            let mut args = vec![
                "install",
                "flywheel",
                &chart,
                RELEASE_NAMESPACE,
                &kubeconfig,
                "replicaCount=1",
                "image.pullPolicy=Never",
                &storage_claim,
                &storage_path,
            ];
            args.extend_from_slice(values);
            helm(&args).map(|_| ()).map_err(|e| e.to_string())
        })
        .await
        .clone()
        .map_err(NodeError::Cluster)?;
    Ok(cluster)
}

/// A namespace for pods (its ServiceAccount exists) whose claim `flywheel-data` is bound to a volume of its
/// own on the node's disk; returns the namespace and that volume's directory on this machine.
pub async fn namespace_with_storage(
    cluster: &TestCluster,
    client: &Client,
    prefix: &str,
) -> Result<(String, PathBuf), NodeError> {
    let namespace = cluster.namespace_for_pods(client, prefix).await?;
    // Removed with the cluster; pods run as 65532, so the directory is open to them.
    let host_dir = cluster.state_dir().join("volumes").join(&namespace);
    std::fs::create_dir_all(&host_dir).map_err(io("creating the volume's directory"))?;
    std::fs::set_permissions(&host_dir, std::fs::Permissions::from_mode(0o777))
        .map_err(io("opening the volume's directory"))?;
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    volumes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": namespace},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadWriteMany"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": "",
                    "claimRef": {"namespace": namespace, "name": CLAIM},
                    "hostPath": {"path": host_dir.to_string_lossy(), "type": "Directory"}
                }
            }))?,
        )
        .await?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &namespace);
    claims
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": CLAIM},
                "spec": {
                    "accessModes": ["ReadWriteMany"],
                    "storageClassName": "",
                    "volumeName": namespace,
                    "resources": {"requests": {"storage": "1Gi"}}
                }
            }))?,
        )
        .await?;
    Ok((namespace, host_dir))
}

/// Runs `flywheel-trainer ARGS` as pod `name` of the trainer image, with the namespace's claim at `STORAGE`
/// and the restricted security context, and waits for it to succeed; a failure carries the pod's log.
pub async fn run_trainer_pod(
    client: &Client,
    namespace: &str,
    name: &str,
    args: &[String],
) -> Result<(), NodeError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": false,
                "securityContext": {"runAsNonRoot": true, "runAsUser": 65532},
                "containers": [{
                    "name": "trainer",
                    "image": image("flywheel-trainer"),
                    "imagePullPolicy": "Never",
                    "args": args,
                    "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
                                        "capabilities": {"drop": ["ALL"]}},
                    "volumeMounts": [{"name": "storage", "mountPath": STORAGE}]
                }],
                "volumes": [{"name": "storage", "persistentVolumeClaim": {"claimName": CLAIM}}]
            }
        }))?,
    )
    .await?;
    let phase = until(&format!("pod {name} to end"), SETTLE, || {
        let pods = pods.clone();
        async move {
            let pod = pods.get(name).await.map_err(|e| e.to_string())?;
            match pod.status.and_then(|s| s.phase) {
                Some(phase) if phase == "Succeeded" || phase == "Failed" => Ok(phase),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await?;
    if phase == "Succeeded" {
        return Ok(());
    }
    let log = pods.logs(name, &LogParams::default()).await?;
    Err(NodeError::PodFailed {
        pod: name.to_owned(),
        phase,
        log,
    })
}

/// Generated CTR data (`train.parquet`, `eval.parquet`, `schema.json`) at `STORAGE/data`, written by a pod.
pub async fn generate_training_data(
    client: &Client,
    namespace: &str,
    rows: u32,
) -> Result<(), NodeError> {
    let args = [
        "generate",
        "--rows",
        &rows.to_string(),
        "--users",
        "200",
        "--items",
        "50",
        "--buckets",
        "1000",
        "--out",
        &format!("{STORAGE}/data"),
    ]
    .map(str::to_owned);
    run_trainer_pod(client, namespace, "generate", &args).await
}

/// The Docker client the node's daemon answers (`$DOCKER`, else `docker` on PATH).
pub fn docker() -> String {
    std::env::var("DOCKER").unwrap_or_else(|_| "docker".to_owned())
}

/// The running Docker container of `pod`'s container `container` (the kubelet labels it so).
pub fn container_of(namespace: &str, pod: &str, container: &str) -> Result<String, String> {
    let output = Command::new(docker())
        .args(["ps", "-q"])
        .args([
            "--filter",
            &format!("label=io.kubernetes.pod.namespace={namespace}"),
        ])
        .args(["--filter", &format!("label=io.kubernetes.pod.name={pod}")])
        .args([
            "--filter",
            &format!("label=io.kubernetes.container.name={container}"),
        ])
        .output()
        .map_err(|e| e.to_string())?;
    let id = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    if id.is_empty() {
        Err(format!("no running container for {namespace}/{pod}"))
    } else {
        Ok(id)
    }
}

/// `docker kill` (SIGKILL): the process gets no chance to clean up, as in a crash or an OOM kill.
pub fn docker_kill(container: &str) -> Result<(), NodeError> {
    let args = ["kill", container];
    let output = Command::new(docker())
        .args(args)
        .output()
        .map_err(io("running docker kill"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(NodeError::Docker {
            args: args.map(str::to_owned).to_vec(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}

/// The operator's pods of the chart's release.
pub async fn operator_pods(client: &Client) -> Result<Vec<Pod>, kube::Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let mut found = pods
        .list(&ListParams::default().labels("app.kubernetes.io/name=flywheel-operator"))
        .await?
        .items;
    found.sort_by_key(|pod| pod.name_any());
    Ok(found)
}

/// The chart's metrics, probe and webhook port of the operator.
pub const OPERATOR_HTTP_PORT: u16 = 8080;

/// The `Authorization` value the operator's Alertmanager webhook accepts: the token in the Secret the operator
/// keeps in its namespace (as an Alertmanager would be configured with it).
pub async fn webhook_authorization(client: &Client) -> Result<String, NodeError> {
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let secret = secrets.get("flywheel-alertmanager-webhook").await?;
    let token = secret
        .data
        .unwrap_or_default()
        .get(flywheel_auth::WEBHOOK_TOKEN_KEY)
        .and_then(|bytes| String::from_utf8(bytes.0.clone()).ok())
        .ok_or_else(|| NodeError::Cluster("the webhook Secret has no token".into()))?;
    Ok(format!("Bearer {token}"))
}

/// Where the leading operator pod's HTTP endpoints answer (its pod IP, reached over the bridge): the pod
/// holding the release's Lease, once it is Ready.
pub async fn leader_address(client: &Client) -> Result<SocketAddr, NodeError> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), RELEASE_NAMESPACE);
    let client = client.clone();
    Ok(until("a Ready operator pod holding the Lease", SETTLE, || {
        let client = client.clone();
        let leases = leases.clone();
        async move {
            let holder = leases
                .get("flywheel-operator")
                .await
                .map_err(|e| e.to_string())?
                .spec
                .and_then(|spec| spec.holder_identity)
                .ok_or("no holder")?;
            let pods = operator_pods(&client).await.map_err(|e| e.to_string())?;
            let pod = pods
                .iter()
                .find(|pod| pod.name_any() == holder)
                .ok_or_else(|| format!("{holder} is not an operator pod"))?;
            let status = pod.status.as_ref().ok_or("no status")?;
            let ready = status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let ip: Ipv4Addr = status
                .pod_ip
                .as_deref()
                .ok_or("no pod IP")?
                .parse()
                .map_err(|e| format!("{e}"))?;
            if ready {
                Ok(SocketAddr::from((ip, OPERATOR_HTTP_PORT)))
            } else {
                Err(format!("{holder} is not Ready"))
            }
        }
    })
    .await?)
}
