//! Serving benchmark: latency and throughput of `flywheel-serving serve` on one core (REST and gRPC, single rows
//! and batches), the same model shape behind a PyTorch + FastAPI server in the same run, and the router's
//! overhead. Prints a table. Run through `scripts/bench-serving.sh`, which trains the model, installs the
//! reference server's Python packages and pins the client to the other core.
//!
//! Environment: FLYWHEEL_BENCH_MODEL (artifact), FLYWHEEL_BENCH_SCHEMA (its schema.json), FLYWHEEL_BENCH_PYTHON
//! (python with torch, fastapi, uvicorn, xxhash; the PyTorch rows are skipped without it),
//! FLYWHEEL_BENCH_SECONDS (per throughput run, default 5), FLYWHEEL_BENCH_SERVER_CPU (default 0).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use flywheel_ml::synthetic::{Impression, SyntheticConfig, generate};
use flywheel_serving::grpc::inference::InferTensorContents;
use flywheel_serving::grpc::inference::ModelInferRequest;
use flywheel_serving::grpc::inference::grpc_inference_service_client::GrpcInferenceServiceClient;
use flywheel_serving::grpc::inference::model_infer_request::InferInputTensor;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::json;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> Result<u16, BoxError> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn pinned(cpu: &str, program: &Path) -> Command {
    let mut command = Command::new("taskset");
    command.args(["-c", cpu]).arg(program);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    command
}

fn rest_body(rows: &[Impression]) -> Bytes {
    let n = rows.len();
    let ints = |name: &str, f: fn(&Impression) -> i64| json!({"name": name, "shape": [n], "datatype": "INT64", "data": rows.iter().map(f).collect::<Vec<_>>()});
    Bytes::from(
        json!({"inputs": [
            ints("user_id", |r| i64::from(r.user_id)),
            ints("item_id", |r| i64::from(r.item_id)),
            ints("category", |r| i64::from(r.category)),
            ints("age", |r| i64::from(r.age)),
            {"name": "gender", "shape": [n], "datatype": "BYTES", "data": rows.iter().map(|r| r.gender).collect::<Vec<_>>()},
            {"name": "device", "shape": [n], "datatype": "BYTES", "data": rows.iter().map(|r| r.device).collect::<Vec<_>>()},
            ints("hour", |r| i64::from(r.hour)),
            {"name": "price", "shape": [n], "datatype": "FP64", "data": rows.iter().map(|r| r.price).collect::<Vec<_>>()},
        ]})
        .to_string(),
    )
}

fn grpc_request(rows: &[Impression]) -> ModelInferRequest {
    let n = rows.len() as i64;
    let tensor = |name: &str, datatype: &str, contents: InferTensorContents| InferInputTensor {
        name: name.into(),
        datatype: datatype.into(),
        shape: vec![n],
        contents: Some(contents),
        ..Default::default()
    };
    let ints = |name: &str, f: fn(&Impression) -> i64| {
        tensor(
            name,
            "INT64",
            InferTensorContents {
                int64_contents: rows.iter().map(f).collect(),
                ..Default::default()
            },
        )
    };
    let strings = |name: &str, f: fn(&Impression) -> &'static str| {
        tensor(
            name,
            "BYTES",
            InferTensorContents {
                bytes_contents: rows.iter().map(|r| f(r).as_bytes().to_vec()).collect(),
                ..Default::default()
            },
        )
    };
    ModelInferRequest {
        model_name: "ctr".into(),
        inputs: vec![
            ints("user_id", |r| i64::from(r.user_id)),
            ints("item_id", |r| i64::from(r.item_id)),
            ints("category", |r| i64::from(r.category)),
            ints("age", |r| i64::from(r.age)),
            strings("gender", |r| r.gender),
            strings("device", |r| r.device),
            ints("hour", |r| i64::from(r.hour)),
            tensor(
                "price",
                "FP64",
                InferTensorContents {
                    fp64_contents: rows.iter().map(|r| r.price).collect(),
                    ..Default::default()
                },
            ),
        ],
        ..Default::default()
    }
}

#[derive(Clone)]
enum Target {
    Rest {
        client: Client<HttpConnector, Full<Bytes>>,
        url: String,
    },
    Grpc(GrpcInferenceServiceClient<tonic::transport::Channel>),
}

impl Target {
    async fn call(&mut self, rest: &Bytes, grpc: &ModelInferRequest) -> Result<(), BoxError> {
        match self {
            Target::Rest { client, url } => {
                let request = http::Request::post(url.as_str())
                    .header("content-type", "application/json")
                    .body(Full::new(rest.clone()))?;
                let response = client.request(request).await?;
                let status = response.status();
                response.into_body().collect().await?;
                if !status.is_success() {
                    return Err(format!("status {status}").into());
                }
            }
            Target::Grpc(client) => {
                client.model_infer(grpc.clone()).await?;
            }
        }
        Ok(())
    }
}

fn rest_target(port: u16) -> Target {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Target::Rest {
        client: Client::builder(TokioExecutor::new()).build(connector),
        url: format!("http://127.0.0.1:{port}/v2/models/ctr/infer"),
    }
}

struct Measured {
    latencies: Vec<Duration>,
    elapsed: Duration,
    errors: usize,
}

/// Closed-loop load: `concurrency` callers, each sending its next request when the last one is answered, for
/// `duration`, after a one-second warm-up.
async fn load(
    target: &Target,
    rows: &[Impression],
    batch: usize,
    concurrency: usize,
    duration: Duration,
) -> Measured {
    let bodies: Arc<Vec<(Bytes, ModelInferRequest)>> = Arc::new(
        rows.chunks(batch)
            .filter(|chunk| chunk.len() == batch)
            .take(512)
            .map(|chunk| (rest_body(chunk), grpc_request(chunk)))
            .collect(),
    );
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for worker in 0..concurrency {
        let (mut target, bodies, measuring, stop) = (
            target.clone(),
            bodies.clone(),
            measuring.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0;
            let mut i = worker;
            while !stop.load(Ordering::Relaxed) {
                let (rest, grpc) = &bodies[i % bodies.len()];
                i += concurrency;
                let started = Instant::now();
                let ok = target.call(rest, grpc).await.is_ok();
                if measuring.load(Ordering::Relaxed) {
                    latencies.push(started.elapsed());
                    errors += usize::from(!ok);
                }
            }
            (latencies, errors)
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let mut measured = Measured {
        latencies: Vec::new(),
        elapsed,
        errors: 0,
    };
    for task in tasks {
        if let Ok((latencies, errors)) = task.await {
            measured.latencies.extend(latencies);
            measured.errors += errors;
        }
    }
    measured.latencies.sort();
    measured
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

fn micros(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}

fn row(server: &str, protocol: &str, batch: usize, concurrency: usize, m: &Measured) -> f64 {
    let requests = m.latencies.len() as f64 / m.elapsed.as_secs_f64();
    println!(
        "| {server:<16} | {protocol:<5} | {batch:>5} | {concurrency:>4} | {:>8} | {:>8} | {:>9.0} | {:>10.0} | {:>6} |",
        micros(percentile(&m.latencies, 0.5)),
        micros(percentile(&m.latencies, 0.99)),
        requests,
        requests * batch as f64,
        m.errors
    );
    requests * batch as f64
}

async fn wait_ready(port: u16) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            stream
                .write_all(b"GET /v2/health/ready HTTP/1.0\r\nHost: x\r\n\r\n")
                .await?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).await?;
            if answer.starts_with("HTTP/1.1 200") || answer.starts_with("HTTP/1.0 200") {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            return Err(format!("server on {port} never became ready").into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn env_path(name: &str) -> Result<PathBuf, BoxError> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .ok_or_else(|| format!("{name} is not set (run scripts/bench-serving.sh)").into())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), BoxError> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let model = env_path("FLYWHEEL_BENCH_MODEL")?;
    let schema = env_path("FLYWHEEL_BENCH_SCHEMA")?;
    let seconds: u64 = std::env::var("FLYWHEEL_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let cpu = std::env::var("FLYWHEEL_BENCH_SERVER_CPU").unwrap_or_else(|_| "0".into());
    let duration = Duration::from_secs(seconds);
    let serving = PathBuf::from(env!("CARGO_BIN_EXE_flywheel-serving"));
    let rows = generate(&SyntheticConfig {
        rows: 20_000,
        ..SyntheticConfig::default()
    })
    .impressions;

    let (http, grpc, admin) = (free_port()?, free_port()?, free_port()?);
    let _server = Killed(
        pinned(&cpu, &serving)
            .args([
                "--runtime-threads",
                "1",
                "serve",
                "--model-name",
                "ctr",
                "--model-version",
                "bench",
            ])
            .arg("--model-uri")
            .arg(&model)
            .args(["--scorer-threads", "1"])
            .args([
                "--http-listen",
                &format!("127.0.0.1:{http}"),
                "--grpc-listen",
                &format!("127.0.0.1:{grpc}"),
            ])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .spawn()?,
    );
    wait_ready(http).await?;

    println!(
        "server pinned to CPU {cpu} (one tokio thread, one scorer thread); client on the other core; {seconds} s per row"
    );
    println!(
        "| server           | proto | batch | conc | p50 (µs) | p99 (µs) | req/s     | rows/s     | errors |"
    );
    println!(
        "|------------------|-------|-------|------|----------|----------|-----------|------------|--------|"
    );
    let rest = rest_target(http);
    let grpc_client = Target::Grpc(
        GrpcInferenceServiceClient::connect(format!("http://127.0.0.1:{grpc}")).await?,
    );
    let mut flywheel = Vec::new();
    for (batch, concurrency) in [(1, 1), (1, 32), (64, 1), (64, 8)] {
        flywheel.push(row(
            "flywheel-serving",
            "rest",
            batch,
            concurrency,
            &load(&rest, &rows, batch, concurrency, duration).await,
        ));
    }
    for (batch, concurrency) in [(1, 1), (1, 32)] {
        row(
            "flywheel-serving",
            "grpc",
            batch,
            concurrency,
            &load(&grpc_client, &rows, batch, concurrency, duration).await,
        );
    }

    match std::env::var_os("FLYWHEEL_BENCH_PYTHON") {
        Some(python) => {
            let port = free_port()?;
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/torch_server.py");
            let _torch = Killed(
                pinned(&cpu, Path::new(&python))
                    .arg(script)
                    .arg("--schema")
                    .arg(&schema)
                    .args([
                        "--port",
                        &port.to_string(),
                        "--dim",
                        "16",
                        "--hidden",
                        "256,128",
                    ])
                    .spawn()?,
            );
            wait_ready(port).await?;
            let torch_target = rest_target(port);
            let mut torch = Vec::new();
            for (batch, concurrency) in [(1, 1), (1, 32), (64, 1), (64, 8)] {
                torch.push(row(
                    "pytorch+fastapi",
                    "rest",
                    batch,
                    concurrency,
                    &load(&torch_target, &rows, batch, concurrency, duration).await,
                ));
            }
            println!();
            for (i, name) in [
                "single rows, 1 caller",
                "single rows, 32 callers",
                "64-row batches, 1 caller",
                "64-row batches, 8 callers",
            ]
            .iter()
            .enumerate()
            {
                println!(
                    "throughput ratio flywheel / pytorch, {name}: {:.1}x",
                    flywheel[i] / torch[i].max(f64::MIN_POSITIVE)
                );
            }
        }
        None => println!("\n(FLYWHEEL_BENCH_PYTHON unset: PyTorch reference not run)"),
    }

    // Router overhead: the same single-row request directly and through the router (router on the client's core).
    let (router_port, router_admin) = (free_port()?, free_port()?);
    let config =
        std::env::temp_dir().join(format!("flywheel-bench-routes-{}.json", std::process::id()));
    std::fs::write(
        &config,
        json!({"backends": [{"name": "bench", "http": format!("http://127.0.0.1:{http}"), "weight": 100}]}).to_string(),
    )?;
    let router_cpu = if cpu == "0" { "1" } else { "0" };
    let _router = Killed(
        pinned(router_cpu, &serving)
            .args(["--runtime-threads", "1", "route"])
            .args([
                "--listen",
                &format!("127.0.0.1:{router_port}"),
                "--admin-listen",
                &format!("127.0.0.1:{router_admin}"),
            ])
            .arg("--config")
            .arg(&config)
            .spawn()?,
    );
    wait_ready(router_port).await?;
    println!();
    println!("| path             | p50 (µs) | p99 (µs) |");
    println!("|------------------|----------|----------|");
    let direct = load(&rest, &rows, 1, 1, duration).await;
    let routed = load(&rest_target(router_port), &rows, 1, 1, duration).await;
    for (name, m) in [("direct", &direct), ("through router", &routed)] {
        println!(
            "| {name:<16} | {:>8} | {:>8} |",
            micros(percentile(&m.latencies, 0.5)),
            micros(percentile(&m.latencies, 0.99))
        );
    }
    println!(
        "router overhead (routed - direct): p50 {} µs, p99 {} µs; errors {}",
        micros(
            percentile(&routed.latencies, 0.5).saturating_sub(percentile(&direct.latencies, 0.5))
        ),
        micros(
            percentile(&routed.latencies, 0.99).saturating_sub(percentile(&direct.latencies, 0.99))
        ),
        routed.errors
    );
    let _ = std::fs::remove_file(&config);
    Ok(())
}
