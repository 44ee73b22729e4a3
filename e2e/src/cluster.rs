//! A fresh etcd + kube-apiserver + kube-controller-manager for this test binary, started by
//! `e2e/scripts/start-cluster.sh` and torn down by its reaper when the binary exits.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};

use crate::repo_root;
use crate::wait::{Timeout, until};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("running {command}: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} failed ({status}):\n{stderr}")]
    Failed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("reading kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("building client: {0}")]
    Client(#[from] kube::Error),
    #[error(transparent)]
    Timeout(#[from] Timeout),
}

pub struct TestCluster {
    dir: PathBuf,
    kubeconfig: PathBuf,
}

static SHARED: OnceLock<Result<TestCluster, String>> = OnceLock::new();
static SHARED_WITH_NODE: OnceLock<Result<TestCluster, String>> = OnceLock::new();

impl TestCluster {
    /// The cluster of this test binary, started on first use; it lives until the binary exits.
    pub fn shared() -> Result<&'static TestCluster, String> {
        SHARED
            .get_or_init(|| TestCluster::start(&[]).map_err(|err| err.to_string()))
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Like [`TestCluster::shared`], with a real node (`start-cluster.sh --with-node`): kubelet and Docker run
    /// the pods, kube-proxy routes Services, dnsmasq answers cluster DNS. One per machine at a time.
    pub fn with_node() -> Result<&'static TestCluster, String> {
        SHARED_WITH_NODE
            .get_or_init(|| TestCluster::start(&["--with-node"]).map_err(|err| err.to_string()))
            .as_ref()
            .map_err(Clone::clone)
    }

    fn start(flags: &[&str]) -> Result<TestCluster, ClusterError> {
        let dir = std::env::temp_dir().join(format!("flywheel-cluster-{}", std::process::id()));
        let script = repo_root().join("e2e/scripts/start-cluster.sh");
        let output = run(Command::new(&script)
            .arg(&dir)
            .arg("--owner-pid")
            .arg(std::process::id().to_string())
            .args(flags))?;
        let kubeconfig = PathBuf::from(
            String::from_utf8_lossy(&output.stdout)
                .trim()
                .lines()
                .last()
                .unwrap_or(""),
        );
        let cluster = TestCluster { dir, kubeconfig };
        cluster.kubectl(&[
            "apply",
            "--validate=false",
            "-f",
            &repo_root().join("crds").to_string_lossy(),
        ])?;
        cluster.kubectl(&[
            "wait",
            "--for",
            "condition=established",
            "--timeout=60s",
            "crd",
            "--all",
        ])?;
        Ok(cluster)
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The cluster's state directory (removed with the cluster): certificates, logs, the node's files.
    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    /// A client for this cluster, bound to the caller's runtime (each `#[tokio::test]` has its own).
    pub async fn client(&self) -> Result<Client, ClusterError> {
        client_from(&self.kubeconfig).await
    }

    /// Starts a current Kubernetes CRD server (apiextensions-apiserver, built by
    /// `e2e/scripts/build-apiextensions.sh`) that delegates authentication to this cluster and stops with it;
    /// returns its kubeconfig. It serves CRDs and custom resources only: use explicit resources, no discovery.
    pub fn start_current_crd_server(&self) -> Result<PathBuf, ClusterError> {
        let script = repo_root().join("e2e/scripts/start-apiextensions.sh");
        let output = run(Command::new(&script).arg(&self.dir))?;
        Ok(PathBuf::from(
            String::from_utf8_lossy(&output.stdout)
                .trim()
                .lines()
                .last()
                .unwrap_or(""),
        ))
    }

    /// Runs the cluster's kubectl (v1.20.2, built with the server) and returns its output; a non-zero exit is an
    /// error carrying stderr, which is where the API server's refusals land.
    pub fn kubectl(&self, args: &[&str]) -> Result<Output, ClusterError> {
        run(Command::new(kubectl_path())
            .env("KUBECONFIG", &self.kubeconfig)
            .args(args))
    }

    /// Like [`TestCluster::kubectl`] with `stdin` piped in (for `apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], stdin: &str) -> Result<Output, ClusterError> {
        use std::io::Write;
        let command = format!("kubectl {}", args.join(" "));
        let mut child = Command::new(kubectl_path())
            .env("KUBECONFIG", &self.kubeconfig)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|source| ClusterError::Spawn {
                command: command.clone(),
                source,
            })?;
        if let Some(mut input) = child.stdin.take() {
            input
                .write_all(stdin.as_bytes())
                .map_err(|source| ClusterError::Spawn {
                    command: command.clone(),
                    source,
                })?;
        }
        let output = child
            .wait_with_output()
            .map_err(|source| ClusterError::Spawn {
                command: command.clone(),
                source,
            })?;
        check(command, output)
    }

    /// A kubeconfig for the same cluster that authenticates with `token` (e.g. a ServiceAccount's).
    pub fn kubeconfig_with_token(&self, name: &str, token: &str) -> std::io::Result<PathBuf> {
        let original = std::fs::read_to_string(&self.kubeconfig)?;
        let replaced: Vec<String> = original
            .lines()
            .map(|line| {
                if line.trim_start().starts_with("token: ") {
                    format!("    token: {token}")
                } else {
                    line.to_owned()
                }
            })
            .collect();
        let path = self.dir.join(format!("kubeconfig-{name}"));
        std::fs::write(&path, replaced.join("\n") + "\n")?;
        Ok(path)
    }

    /// Makes sure `pid` dies with the cluster (the reaper kills every pid in the cluster's pid file).
    pub fn adopt(&self, pid: u32) -> std::io::Result<()> {
        use std::io::Write;
        let mut pids = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.join("pids"))?;
        writeln!(pids, "{pid}")
    }

    /// A namespace for one test on the node's cluster, once its `default` ServiceAccount exists: the
    /// ServiceAccount admission plugin refuses pods before that.
    pub async fn namespace_for_pods(
        &self,
        client: &Client,
        prefix: &str,
    ) -> Result<String, ClusterError> {
        let namespace = self.namespace(client, prefix).await?;
        let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
        until(
            &format!("the default ServiceAccount of {namespace}"),
            std::time::Duration::from_secs(30),
            || {
                let accounts = accounts.clone();
                async move {
                    accounts
                        .get("default")
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
            },
        )
        .await?;
        Ok(namespace)
    }

    /// Creates a namespace with a unique name for one test.
    pub async fn namespace(&self, client: &Client, prefix: &str) -> Result<String, ClusterError> {
        let api: Api<Namespace> = Api::all(client.clone());
        let namespace = Namespace {
            metadata: ObjectMeta {
                generate_name: Some(format!("{prefix}-")),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        let created = api.create(&PostParams::default(), &namespace).await?;
        Ok(created.metadata.name.unwrap_or_default())
    }
}

/// A client for the API server of `kubeconfig`, bound to the caller's runtime.
pub async fn client_from(kubeconfig: &Path) -> Result<Client, ClusterError> {
    let kubeconfig = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// kubectl v1.20.2 from the build cache (matching the server), else the one on PATH.
pub fn kubectl_path() -> PathBuf {
    let cache = std::env::var_os("FLYWHEEL_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/flywheel")
        });
    let built = cache.join("kube-v1.20.2/kubectl");
    if built.exists() {
        built
    } else {
        PathBuf::from("kubectl")
    }
}

fn run(command: &mut Command) -> Result<Output, ClusterError> {
    let text = format!("{command:?}");
    let output = command.output().map_err(|source| ClusterError::Spawn {
        command: text.clone(),
        source,
    })?;
    check(text, output)
}

fn check(command: String, output: Output) -> Result<Output, ClusterError> {
    if output.status.success() {
        Ok(output)
    } else {
        Err(ClusterError::Failed {
            command,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}
