//! Real Prometheus servers and their HTTP query API: Debian's, scraping given local targets, or the cluster's,
//! discovering its targets through the API server.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::cluster::TestCluster;
use crate::http::http_get_at;
use crate::on_node::NODE_IP;
use crate::repo_root;
use crate::wait::{Timeout, until};

#[derive(Debug, thiserror::Error)]
pub enum PrometheusError {
    #[error("starting prometheus: {0}")]
    Io(#[from] std::io::Error),
    #[error("prometheus answered {code}: {body}")]
    Http { code: u16, body: String },
    #[error("decoding the prometheus answer: {0}")]
    Decode(#[from] serde_json::Error),
    #[error(transparent)]
    Timeout(#[from] Timeout),
    #[error("start-prometheus.sh: {0}")]
    Script(String),
}

pub struct PrometheusServer {
    /// The process this handle started and stops; a cluster's Prometheus stops with its cluster instead.
    child: Option<Child>,
    dir: Option<PathBuf>,
    pub address: SocketAddr,
}

impl PrometheusServer {
    /// Starts Debian's Prometheus listening on `listen` and scraping each `(job, port)` on 127.0.0.1 every
    /// second, and waits until it answers. Listening on the node's address, pods reach it too.
    pub async fn start(
        listen: Ipv4Addr,
        targets: &[(&str, u16)],
    ) -> Result<PrometheusServer, PrometheusError> {
        let port = std::net::TcpListener::bind((listen, 0))?
            .local_addr()?
            .port();
        let address = SocketAddr::from((listen, port));
        let dir =
            std::env::temp_dir().join(format!("flywheel-prometheus-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let jobs: String = targets
            .iter()
            .map(|(job, target)| format!("  - job_name: {job}\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n{jobs}"
        );
        std::fs::write(dir.join("prometheus.yml"), config)?;
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={address}"))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()?;
        let server = PrometheusServer {
            child: Some(child),
            dir: Some(dir),
            address,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    /// The cluster's Prometheus (`e2e/scripts/start-prometheus.sh`): Prometheus 3 on the node's address,
    /// finding the operator and the serving pods through the API server as the chart's ServiceMonitor and
    /// PodMonitor select them, evaluating `rules` when given. It stops with the cluster.
    pub async fn for_cluster(
        cluster: &TestCluster,
        rules: Option<&Path>,
    ) -> Result<PrometheusServer, PrometheusError> {
        let mut command = Command::new(repo_root().join("e2e/scripts/start-prometheus.sh"));
        command.arg(cluster.state_dir()).arg(NODE_IP.to_string());
        if let Some(rules) = rules {
            command.arg(rules);
        }
        let output = command.output()?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            return Err(PrometheusError::Script(format!(
                "{stdout}{}",
                String::from_utf8_lossy(&output.stderr)
            )));
        }
        let url = stdout.trim().lines().last().unwrap_or_default();
        let address = url
            .trim_start_matches("http://")
            .parse()
            .map_err(|_| PrometheusError::Script(format!("no address in {url:?}")))?;
        let server = PrometheusServer {
            child: None,
            dir: None,
            address,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    /// Its base URL, as a Rollout's `analysis.prometheus` names it.
    pub fn url(&self) -> String {
        format!("http://{}", self.address)
    }

    async fn wait_ready(&self) -> Result<(), PrometheusError> {
        let address = self.address;
        until(
            "prometheus to be ready",
            Duration::from_secs(30),
            || async move {
                match http_get_at(address, "/-/ready").await {
                    Ok((200, _)) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await?;
        Ok(())
    }

    /// Runs an instant query and returns `data.result`.
    pub async fn query(&self, promql: &str) -> Result<Vec<Value>, PrometheusError> {
        let (code, body) = http_get_at(
            self.address,
            &format!("/api/v1/query?query={}", percent_encode(promql)),
        )
        .await?;
        if code != 200 {
            return Err(PrometheusError::Http { code, body });
        }
        let answer: Value = serde_json::from_str(&body)?;
        Ok(answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// `/api/v1/targets` active targets: `(job, health, lastError)`.
    pub async fn targets(&self) -> Result<Vec<(String, String, String)>, PrometheusError> {
        let (code, body) = http_get_at(self.address, "/api/v1/targets").await?;
        if code != 200 {
            return Err(PrometheusError::Http { code, body });
        }
        let answer: Value = serde_json::from_str(&body)?;
        Ok(answer["data"]["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
                (
                    text(&t["labels"]["job"]),
                    text(&t["health"]),
                    text(&t["lastError"]),
                )
            })
            .collect())
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}
