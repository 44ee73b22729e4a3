//! The online data plane as real processes on 127.0.0.1: trained model artifacts, `flywheel-serving serve`
//! and `route`, a Kafka-protocol broker (tansu), and a keep-alive HTTP client to drive them.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use flywheel_ml::synthetic::{Impression, SyntheticConfig, generate};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::bin_dir;
use crate::http::http_get;
use crate::wait::until;

#[derive(Debug, thiserror::Error)]
pub enum ServingError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0} failed: {1}")]
    Command(String, String),
    #[error(transparent)]
    Timeout(#[from] crate::wait::Timeout),
    #[error("http: {0}")]
    Http(String),
}

pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServingError {
    let what = what.into();
    move |source| ServingError::Io { what, source }
}

/// A free port on 127.0.0.1 (released before use; tests run on one machine, so a collision is unlikely).
pub fn free_port() -> Result<u16, ServingError> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(io("binding a port"))?;
    Ok(listener.local_addr().map_err(io("local address"))?.port())
}

pub(crate) fn run(command: &mut Command, what: &str) -> Result<String, ServingError> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(io(what.to_owned()))?;
    if !output.status.success() {
        return Err(ServingError::Command(
            what.to_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        ));
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The data the trainer's `generate` writes for these arguments, regenerated in memory, and the eval rows.
pub struct Dataset {
    pub dir: PathBuf,
    pub eval: Vec<Impression>,
}

/// `flywheel-trainer generate` into `dir`; the same impressions are regenerated here to send as requests.
pub fn dataset(dir: &Path, rows: usize, seed: u64) -> Result<Dataset, ServingError> {
    let (users, items, buckets) = (2_000u32, 500u32, 10_000u64);
    run(
        Command::new(bin_dir().join("flywheel-trainer"))
            .args([
                "generate",
                "--rows",
                &rows.to_string(),
                "--seed",
                &seed.to_string(),
            ])
            .args(["--users", &users.to_string(), "--items", &items.to_string()])
            .args(["--buckets", &buckets.to_string(), "--eval-fraction", "0.2"])
            .arg("--out")
            .arg(dir),
        "flywheel-trainer generate",
    )?;
    let data = generate(&SyntheticConfig {
        seed,
        users,
        items,
        rows,
        ..SyntheticConfig::default()
    });
    let split = ((rows as f64) * 0.8) as usize;
    Ok(Dataset {
        dir: dir.to_owned(),
        eval: data.impressions[split..].to_vec(),
    })
}

/// Trains a small model on `data` into `out` and returns the artifact path.
pub fn train(data: &Path, out: &Path, seed: u64) -> Result<PathBuf, ServingError> {
    run(
        Command::new(bin_dir().join("flywheel-trainer"))
            .arg("train")
            .arg("--train")
            .arg(data.join("train.parquet"))
            .arg("--eval")
            .arg(data.join("eval.parquet"))
            .arg("--schema")
            .arg(data.join("schema.json"))
            .args(["--hidden", "32,16", "--embedding-dim", "8", "--epochs", "2"])
            .args(["--seed", &seed.to_string()])
            .arg("--output")
            .arg(out),
        "flywheel-trainer train",
    )?;
    Ok(out.join("model.fwm"))
}

/// The trainer's offline scores of the eval rows (`flywheel-trainer score`).
pub fn offline_scores(model: &Path, data: &Path) -> Result<Vec<f64>, ServingError> {
    let out = data.join(format!(
        "scores-{}.json",
        model
            .parent()
            .and_then(Path::file_name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));
    run(
        Command::new(bin_dir().join("flywheel-trainer"))
            .arg("score")
            .arg("--model")
            .arg(model)
            .arg("--data")
            .arg(data.join("eval.parquet"))
            .arg("--out")
            .arg(&out),
        "flywheel-trainer score",
    )?;
    let text = std::fs::read(&out).map_err(io("reading offline scores"))?;
    serde_json::from_slice(&text).map_err(|err| ServingError::Http(err.to_string()))
}

/// The inference request body (KServe v2 JSON) for `rows`.
pub fn rest_body(id: Option<&str>, rows: &[Impression]) -> Value {
    let ints = |f: fn(&Impression) -> i64| rows.iter().map(f).collect::<Vec<i64>>();
    let n = rows.len();
    let int_input = |name: &str, data: Vec<i64>| json!({"name": name, "shape": [n], "datatype": "INT64", "data": data});
    let mut body = json!({
        "inputs": [
            int_input("user_id", ints(|r| i64::from(r.user_id))),
            int_input("item_id", ints(|r| i64::from(r.item_id))),
            int_input("category", ints(|r| i64::from(r.category))),
            int_input("age", ints(|r| i64::from(r.age))),
            {"name": "gender", "shape": [n], "datatype": "BYTES", "data": rows.iter().map(|r| r.gender).collect::<Vec<_>>()},
            {"name": "device", "shape": [n], "datatype": "BYTES", "data": rows.iter().map(|r| r.device).collect::<Vec<_>>()},
            int_input("hour", ints(|r| i64::from(r.hour))),
            {"name": "price", "shape": [n], "datatype": "FP64", "data": rows.iter().map(|r| r.price).collect::<Vec<_>>()},
        ]
    });
    if let Some(id) = id {
        body["id"] = json!(id);
    }
    body
}

/// A child process killed when dropped.
pub struct Process {
    child: Child,
    pub name: String,
}

impl Process {
    pub fn spawn(name: &str, command: &mut Command, log: &Path) -> Result<Process, ServingError> {
        let log = std::fs::File::create(log).map_err(io(format!("{name} log")))?;
        let err = log.try_clone().map_err(io(format!("{name} log")))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(io(format!("starting {name}")))?;
        Ok(Process {
            child,
            name: name.to_owned(),
        })
    }

    /// Whether the process has ended, without waiting.
    pub fn has_exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes a freshly generated token to `<dir>/<name>` (as the operator's Secret mount would hold it); returns
/// the file and the `Authorization` header value that carries it.
pub fn token_file(dir: &Path, name: &str) -> Result<(PathBuf, String), ServingError> {
    let token =
        flywheel_auth::Token::generate().map_err(|err| ServingError::Http(err.to_string()))?;
    let path = dir.join(name);
    std::fs::create_dir_all(dir).map_err(io("creating the token directory"))?;
    std::fs::write(&path, token.expose()).map_err(io("writing the token"))?;
    Ok((path, token.bearer()))
}

/// A running `flywheel-serving serve`.
pub struct Server {
    pub process: Process,
    pub http: u16,
    pub grpc: u16,
    pub admin: u16,
}

impl Server {
    /// Starts a server of model `ctr` with `extra` arguments (the model source among them) and waits until its
    /// HTTP port answers (ready or not).
    pub async fn start(dir: &Path, name: &str, extra: &[&str]) -> Result<Server, ServingError> {
        let (http, grpc, admin) = (free_port()?, free_port()?, free_port()?);
        let process = Process::spawn(
            name,
            Command::new(bin_dir().join("flywheel-serving"))
                .args(["serve", "--model-name", "ctr"])
                .args(["--http-listen", &format!("127.0.0.1:{http}")])
                .args(["--grpc-listen", &format!("127.0.0.1:{grpc}")])
                .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
                .args(extra),
            &dir.join(format!("{name}.log")),
        )?;
        until(
            &format!("{name} listening"),
            Duration::from_secs(30),
            || async move {
                http_get(http, "/v2/health/live")
                    .await
                    .map(|_| ())
                    .map_err(|err| err.to_string())
            },
        )
        .await?;
        Ok(Server {
            process,
            http,
            grpc,
            admin,
        })
    }

    pub async fn metrics(&self) -> Result<String, ServingError> {
        http_get(self.admin, "/metrics")
            .await
            .map(|(_, body)| body)
            .map_err(|err| ServingError::Http(err.to_string()))
    }
}

/// The value of the series `name{labels…}` whose label text contains every `labels` entry.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.split(['{', ' '])
                .next()
                .is_some_and(|series| series == name)
        })
        .find(|line| labels.iter().all(|label| line.contains(label)))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}

/// A keep-alive HTTP/1.1 client.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for HttpClient {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        HttpClient {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }
}

impl HttpClient {
    /// Sends `body` (JSON) with `method` and optional headers to 127.0.0.1; returns the status and the JSON
    /// answer.
    pub async fn send(
        &self,
        method: &str,
        port: u16,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<(u16, Value), ServingError> {
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        self.send_to(method, address, path, body, headers).await
    }

    /// Like [`HttpClient::send`], to any address (a pod's, a Service's ClusterIP).
    pub async fn send_to(
        &self,
        method: &str,
        address: SocketAddr,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<(u16, Value), ServingError> {
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("http://{address}{path}"))
            .header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|err| ServingError::Http(err.to_string()))?;
        let response = self
            .client
            .request(request)
            .await
            .map_err(|err| ServingError::Http(format!("{path}: {err}")))?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|err| ServingError::Http(err.to_string()))?
            .to_bytes();
        let json = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Ok((status, json))
    }

    pub async fn post(
        &self,
        port: u16,
        path: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> Result<(u16, Value), ServingError> {
        self.send(
            "POST",
            port,
            path,
            Some(body.to_string().into_bytes()),
            headers,
        )
        .await
    }
}

/// A Kafka-protocol broker (tansu, built by `e2e/scripts/build-tansu.sh`) with in-memory storage.
pub struct Broker {
    _process: Process,
    pub address: String,
    tansu: PathBuf,
}

impl Broker {
    pub async fn start(dir: &Path) -> Result<Broker, ServingError> {
        Broker::start_on(dir, Ipv4Addr::LOCALHOST).await
    }

    /// A broker listening on `listen` (the node's address, for pods to reach it).
    pub async fn start_on(dir: &Path, listen: Ipv4Addr) -> Result<Broker, ServingError> {
        let tansu = tansu_binary();
        let port = free_port()?;
        let address = format!("{listen}:{port}");
        let url = format!("tcp://{address}");
        let process = Process::spawn(
            "tansu",
            Command::new(&tansu)
                .args(["broker", "--listener-url", &url])
                .args(["--advertised-listener-url", &url])
                .args(["--storage-engine", "memory://tansu/"]),
            &dir.join("tansu.log"),
        )?;
        until("tansu listening", Duration::from_secs(30), || async move {
            tokio::net::TcpStream::connect((listen, port))
                .await
                .map(|_| ())
                .map_err(|err| err.to_string())
        })
        .await?;
        Ok(Broker {
            _process: process,
            address,
            tansu,
        })
    }

    pub fn create_topic(&self, name: &str) -> Result<(), ServingError> {
        self.create_topic_with_partitions(name, 1)
    }

    pub fn create_topic_with_partitions(
        &self,
        name: &str,
        partitions: u32,
    ) -> Result<(), ServingError> {
        run(
            Command::new(&self.tansu)
                .args([
                    "topic",
                    "create",
                    "--broker",
                    &format!("tcp://{}", self.address),
                ])
                .args(["--partitions", &partitions.to_string(), name]),
            "tansu topic create",
        )
        .map(|_| ())
    }
}

/// An empty directory for one test's files, `flywheel-<name>-<pid>` under the system's temporary directory.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flywheel-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::create_dir_all(&dir);
    dir
}

/// The scores of an Open Inference Protocol answer (its first output).
pub fn scores_of(answer: &Value) -> Vec<f64> {
    answer["outputs"][0]["data"]
        .as_array()
        .map(|data| data.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default()
}

/// Rows `flywheel-trainer log-traffic` reported writing (predictions, clicks), from its log.
pub fn sink_written(log: &Path) -> (u64, u64) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|event| event["event"] == "part")
        .fold((0, 0), |(predictions, clicks), event| {
            (
                predictions + event["predictions"].as_u64().unwrap_or(0),
                clicks + event["clicks"].as_u64().unwrap_or(0),
            )
        })
}

/// The broker `e2e/scripts/build-tansu.sh` built into the cache.
pub fn tansu_binary() -> PathBuf {
    let cache = std::env::var_os("FLYWHEEL_CACHE").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/flywheel"),
        PathBuf::from,
    );
    cache.join("tansu/bin/tansu")
}

/// Debian's redis-server on a free port, in memory only.
pub struct Redis {
    _process: Process,
    pub port: u16,
}

impl Redis {
    pub async fn start(dir: &Path) -> Result<Redis, ServingError> {
        Redis::start_with(dir, &[]).await
    }

    /// A server with further configuration `options` (`--name value` pairs).
    pub async fn start_with(dir: &Path, options: &[&str]) -> Result<Redis, ServingError> {
        let port = free_port()?;
        let process = Process::spawn(
            "redis",
            Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .args(options),
            &dir.join("redis.log"),
        )?;
        until("redis listening", Duration::from_secs(20), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map(|_| ())
                .map_err(|err| err.to_string())
        })
        .await?;
        Ok(Redis {
            _process: process,
            port,
        })
    }

    /// Runs one command with `redis-cli`.
    pub fn command(&self, args: &[&str]) -> Result<String, ServingError> {
        run(
            Command::new("redis-cli")
                .args(["-p", &self.port.to_string()])
                .args(args),
            "redis-cli",
        )
    }
}
