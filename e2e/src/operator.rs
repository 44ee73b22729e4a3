//! The operator binary as a process of this machine, for the benchmarks that measure the operator alone on a
//! cluster without a node (its reconcile counters and memory); every test runs the chart's operator pods.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use crate::bin_dir;
use crate::cluster::TestCluster;
use crate::http::http_get;

pub struct OperatorProcess {
    child: Child,
    pub identity: String,
    pub http_port: u16,
    /// The `Authorization` value the operator's Alertmanager webhook accepts.
    pub webhook_authorization: String,
}

impl OperatorProcess {
    /// Starts `flywheel-operator` against `cluster` with `extra` arguments; its logs go to
    /// `<tmp>/flywheel-operator-<identity>.log`.
    pub fn spawn(
        cluster: &TestCluster,
        identity: &str,
        extra: &[&str],
    ) -> std::io::Result<OperatorProcess> {
        Self::spawn_with(cluster, cluster.kubeconfig(), identity, extra)
    }

    /// Like [`OperatorProcess::spawn`] with another kubeconfig (e.g. a ServiceAccount's token, to test RBAC).
    pub fn spawn_with(
        cluster: &TestCluster,
        kubeconfig: &Path,
        identity: &str,
        extra: &[&str],
    ) -> std::io::Result<OperatorProcess> {
        let http_port = free_port()?;
        let binary = bin_dir().join("flywheel-operator");
        if !binary.exists() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!(
                    "{} is missing: run `cargo build --workspace --bins` first",
                    binary.display()
                ),
            ));
        }
        let log = std::fs::File::create(
            std::env::temp_dir().join(format!("flywheel-operator-{identity}.log")),
        )?;
        let token = flywheel_auth::Token::generate().map_err(std::io::Error::other)?;
        let token_file =
            std::env::temp_dir().join(format!("flywheel-operator-{identity}.webhook-token"));
        std::fs::write(&token_file, token.expose())?;
        let child = Command::new(binary)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .arg("--identity")
            .arg(identity)
            .arg("--http-addr")
            .arg(format!("127.0.0.1:{http_port}"))
            .arg("--alertmanager-token-file")
            .arg(&token_file)
            .args(extra)
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()?;
        cluster.adopt(child.id())?;
        Ok(OperatorProcess {
            child,
            identity: identity.to_owned(),
            http_port,
            webhook_authorization: token.bearer(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: a crash, with no chance to release the Lease.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits for the exit status.
    pub fn terminate(&mut self) -> std::io::Result<std::process::ExitStatus> {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()?;
        if !status.success() {
            return Err(std::io::Error::other("kill -TERM failed"));
        }
        self.child.wait()
    }

    /// Reconciles run so far, all kinds (from its /metrics).
    pub async fn reconciliations(&self) -> std::io::Result<u64> {
        let (_, body) = self.get("/metrics").await?;
        Ok(body
            .lines()
            .filter(|line| line.starts_with("flywheel_operator_reconciliations_total"))
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum())
    }

    /// A memory figure of the process from /proc (`VmRSS`, `VmHWM`), in KiB.
    pub fn memory_kib(&self, field: &str) -> std::io::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|line| {
                line.strip_prefix(field)?
                    .trim_start_matches(':')
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
            .ok_or_else(|| std::io::Error::other(format!("no {field} in /proc status")))
    }

    /// GET of a path on the metrics/probe port: (status code, body).
    pub async fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(self.http_port, path).await
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
