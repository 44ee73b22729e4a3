//! A real Prometheus server (Debian's `prometheus`) scraping local targets, and its HTTP query API.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::http::http_get;
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
}

pub struct PrometheusServer {
    child: Child,
    dir: PathBuf,
    pub port: u16,
}

impl PrometheusServer {
    /// Starts Prometheus scraping each `(job, port)` on 127.0.0.1 every second, and waits until it answers.
    pub async fn start(targets: &[(&str, u16)]) -> Result<PrometheusServer, PrometheusError> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
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
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()?;
        let server = PrometheusServer { child, dir, port };
        until(
            "prometheus to be ready",
            Duration::from_secs(30),
            || async {
                match http_get(port, "/-/ready").await {
                    Ok((200, _)) => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await?;
        Ok(server)
    }

    /// Runs an instant query and returns `data.result`.
    pub async fn query(&self, promql: &str) -> Result<Vec<Value>, PrometheusError> {
        let (code, body) = http_get(
            self.port,
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
        let (code, body) = http_get(self.port, "/api/v1/targets").await?;
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
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
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
